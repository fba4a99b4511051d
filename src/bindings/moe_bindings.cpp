// Bindings of the fused MoE layer's ops (moelora/moe.h) as _C.moe_*(...) over tensor refs made
// by moelora._tensor.as_ref; enums cross as their integer codes. Checks live in the library;
// the binding converts and calls with the GIL released.
#include <cstdint>

#include "bindings/common.h"
#include "moelora/moe.h"
#include "mxfp4_layout.h"

namespace moelora::bindings {

namespace {

MoeExpertWeights expert_weights(int format, const py::tuple& weight, const py::object& scales,
                                const py::object& bias, int32_t block_n, int32_t block_k,
                                int mxfp4_layout) {
  MoeExpertWeights w;
  w.format = static_cast<MoeWeightFormat>(format);
  w.mxfp4_layout = static_cast<MoeMxfp4Layout>(mxfp4_layout);
  w.weight = to_tensor_ref(weight, "weight");
  w.scales = to_optional_tensor_ref(scales, "scales");
  w.bias = to_optional_tensor_ref(bias, "bias");
  w.block_n = block_n;
  w.block_k = block_k;
  return w;
}

}  // namespace

void register_moe(py::module_& m) {
  m.attr("MOE_MAX_EXPERTS") = kMoeMaxExperts;
  m.attr("MOE_MAX_STREAM_CONSUMERS") = kMoeMaxStreamConsumers;
  m.attr("MOE_MAX_GEMM_SPLITS") = kMoeMaxGemmSplits;
  // The MXFP4 mma layout's table, the one source of Python's repack (moelora.ops.moe):
  // [element][bit] -> bit of the word, and the permutation's displacements.
  py::list positions;
  for (const auto& element : mxfp4::kMmaPosition) {
    positions.append(py::make_tuple(element[0], element[1], element[2], element[3]));
  }
  m.attr("MXFP4_MMA_POSITIONS") = py::tuple(positions);
  // The tiled layout's shape (moelora.ops.moe.mxfp4_to_tiled_layout).
  m.attr("MXFP4_TILE_ROWS") = mxfp4::kTileRows;
  m.attr("MXFP4_STEP_BLOCKS") = mxfp4::kStepBlocks;
  m.def("mxfp4_to_mma_word", [](uint32_t w) { return mxfp4::to_mma(w); }, py::arg("word"));
  m.def("mxfp4_from_mma_word", [](uint32_t w) { return mxfp4::from_mma(w); }, py::arg("word"));
  m.def("moe_route_max_blocks", &moe_route_max_blocks, py::arg("num_pairs"),
        py::arg("num_experts"), py::arg("block_m"));
  m.def(
      "moe_route_workspace_bytes",
      [](int64_t num_tokens, int32_t num_experts, bool cuda) {
        return moe_route_workspace_bytes(num_tokens, num_experts,
                                         cuda ? DeviceKind::kCUDA : DeviceKind::kCPU);
      },
      py::arg("num_tokens"), py::arg("num_experts"), py::arg("cuda"));

  m.def("moe_router_logits", [](const py::tuple& x, const py::tuple& weight,
                                const py::object& bias, const py::tuple& logits,
                                uintptr_t stream) {
    TensorRef input = to_tensor_ref(x, "x");
    TensorRef w = to_tensor_ref(weight, "weight");
    TensorRef b = to_optional_tensor_ref(bias, "bias");
    TensorRef out = to_tensor_ref(logits, "logits");
    py::gil_scoped_release release;
    moe_router_logits(input, w, b, out, stream_from_int(stream));
  });

  m.def("moe_route", [](const py::tuple& router_logits, int32_t top_k, int routing,
                        bool renormalize, int32_t block_m, const py::tuple& topk_ids,
                        const py::tuple& topk_weights, const py::tuple& sorted_pairs,
                        const py::tuple& block_expert, const py::tuple& num_blocks,
                        const py::tuple& expert_counts, uintptr_t stream,
                        const py::object& workspace) {
    TensorRef logits = to_tensor_ref(router_logits, "router_logits");
    TensorRef ids = to_tensor_ref(topk_ids, "topk_ids");
    TensorRef weights = to_tensor_ref(topk_weights, "topk_weights");
    TensorRef pairs = to_tensor_ref(sorted_pairs, "sorted_pairs");
    TensorRef experts = to_tensor_ref(block_expert, "block_expert");
    TensorRef count = to_tensor_ref(num_blocks, "num_blocks");
    TensorRef counts = to_tensor_ref(expert_counts, "expert_counts");
    TensorRef scratch = to_optional_tensor_ref(workspace, "workspace");
    py::gil_scoped_release release;
    moe_route(logits, top_k, static_cast<MoeRouting>(routing), renormalize, block_m, ids,
              weights, pairs, experts, count, counts, stream_from_int(stream), scratch);
  });

  m.def("moe_expert_gemm", [](const py::tuple& input, int32_t input_pairs_per_row, int format,
                              const py::tuple& weight, const py::object& scales,
                              const py::object& bias, int32_t block_n, int32_t block_k,
                              int mxfp4_layout, const py::tuple& sorted_pairs,
                              const py::tuple& block_expert,
                              const py::tuple& num_blocks, int32_t block_m, int activation,
                              float swiglu_alpha, float swiglu_limit,
                              const py::object& topk_weights, const py::tuple& output,
                              uintptr_t stream, int kernel, bool fall_back,
                              int32_t stream_consumers, int32_t splits,
                              const py::object& workspace) {
    TensorRef in = to_tensor_ref(input, "input");
    MoeExpertWeights w =
        expert_weights(format, weight, scales, bias, block_n, block_k, mxfp4_layout);
    TensorRef pairs = to_tensor_ref(sorted_pairs, "sorted_pairs");
    TensorRef experts = to_tensor_ref(block_expert, "block_expert");
    TensorRef count = to_tensor_ref(num_blocks, "num_blocks");
    MoeEpilogue epilogue;
    epilogue.activation = static_cast<MoeActivation>(activation);
    epilogue.swiglu_alpha = swiglu_alpha;
    epilogue.swiglu_limit = swiglu_limit;
    epilogue.topk_weights = to_optional_tensor_ref(topk_weights, "topk_weights");
    TensorRef out = to_tensor_ref(output, "output");
    MoeGemmOptions options;
    options.kernel = static_cast<MoeGemmKernel>(kernel);
    options.fall_back = fall_back;
    options.stream_consumers = stream_consumers;
    options.splits = splits;
    options.workspace = to_optional_tensor_ref(workspace, "workspace");
    py::gil_scoped_release release;
    moe_expert_gemm(in, input_pairs_per_row, w, pairs, experts, count, block_m, epilogue, out,
                    stream_from_int(stream), options);
  });

  m.def("moe_dequantize", [](int format, const py::tuple& weight, const py::object& scales,
                             int32_t block_n, int32_t block_k, int mxfp4_layout,
                             int64_t first_expert, const py::tuple& out, uintptr_t stream) {
    MoeExpertWeights w =
        expert_weights(format, weight, scales, py::none(), block_n, block_k, mxfp4_layout);
    TensorRef o = to_tensor_ref(out, "out");
    py::gil_scoped_release release;
    moe_dequantize(w, first_expert, o, stream_from_int(stream));
  });

  m.def(
      "moe_activation",
      [](const py::tuple& h13, int activation, float swiglu_alpha, float swiglu_limit,
         const py::tuple& h, uintptr_t stream, const py::object& addend) {
        TensorRef in = to_tensor_ref(h13, "h13");
        TensorRef out = to_tensor_ref(h, "h");
        TensorRef add = to_optional_tensor_ref(addend, "addend");
        py::gil_scoped_release release;
        moe_activation(in, static_cast<MoeActivation>(activation), swiglu_alpha, swiglu_limit,
                       out, stream_from_int(stream), add);
      },
      py::arg("h13"), py::arg("activation"), py::arg("swiglu_alpha"), py::arg("swiglu_limit"),
      py::arg("h"), py::arg("stream"), py::arg("addend") = py::none());

  m.def(
      "moe_sum",
      [](const py::tuple& y, int32_t top_k, const py::tuple& out, uintptr_t stream,
         const py::object& addend) {
        TensorRef in = to_tensor_ref(y, "y");
        TensorRef o = to_tensor_ref(out, "out");
        TensorRef add = to_optional_tensor_ref(addend, "addend");
        py::gil_scoped_release release;
        moe_sum(in, top_k, o, stream_from_int(stream), add);
      },
      py::arg("y"), py::arg("top_k"), py::arg("out"), py::arg("stream"),
      py::arg("addend") = py::none());
}

}  // namespace moelora::bindings
