// Bindings of the kernels' contract (moelora/ops.h): LoraSiteView and KvCacheView as plain
// Python classes (pointers as ints, dtype as the moelora::DType code), and each op as
// _C.<op>(...) over tensor refs made by moelora._tensor.as_ref, building the op's argument
// struct once. Checks live in the library; the binding converts and calls with the GIL released.
#include <cstdint>
#include <vector>

#include "bindings/common.h"
#include "moelora/ops.h"

namespace moelora::bindings {

// The plan types (plan_bindings.cpp): every op takes a plan.
void register_plan(py::module_& m);

namespace {

using LoraOp = void (*)(const FusedMoeLoraArgs&, void*, const LoraPlan*);

template <typename T>
uintptr_t as_int(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr);
}

void register_views(py::module_& m) {
  // dynamic_attr: moelora.ops.make_site_view pins the torch tensors the pointers refer to.
  py::class_<LoraSiteView>(m, "LoraSiteView", py::dynamic_attr())
      .def(py::init([](uintptr_t arena, uintptr_t row_offsets, int64_t slot_stride,
                       uintptr_t ranks, int64_t rank_slot_stride, int32_t num_slots,
                       int32_t num_experts, int32_t max_rank, int64_t in_dim, int64_t out_dim,
                       int dtype) {
             LoraSiteView v;
             v.arena = reinterpret_cast<const std::byte*>(arena);
             v.row_offsets = reinterpret_cast<const int64_t*>(row_offsets);
             v.slot_stride = slot_stride;
             v.ranks = reinterpret_cast<const int32_t*>(ranks);
             v.rank_slot_stride = rank_slot_stride;
             v.num_slots = num_slots;
             v.num_experts = num_experts;
             v.max_rank = max_rank;
             v.in_dim = in_dim;
             v.out_dim = out_dim;
             v.dtype = static_cast<DType>(dtype);
             dtype_size(v.dtype);  // validates the code
             return v;
           }),
           py::kw_only(), py::arg("arena") = 0, py::arg("row_offsets") = 0,
           py::arg("slot_stride") = 0, py::arg("ranks") = 0, py::arg("rank_slot_stride") = 0,
           py::arg("num_slots") = 0, py::arg("num_experts") = 1, py::arg("max_rank") = 0,
           py::arg("in_dim") = 0, py::arg("out_dim") = 0, py::arg("dtype") = 0)
      .def_property(
          "arena", [](const LoraSiteView& v) { return as_int(v.arena); },
          [](LoraSiteView& v, uintptr_t p) { v.arena = reinterpret_cast<const std::byte*>(p); })
      .def_property(
          "row_offsets", [](const LoraSiteView& v) { return as_int(v.row_offsets); },
          [](LoraSiteView& v, uintptr_t p) { v.row_offsets = reinterpret_cast<const int64_t*>(p); })
      .def_property(
          "ranks", [](const LoraSiteView& v) { return as_int(v.ranks); },
          [](LoraSiteView& v, uintptr_t p) { v.ranks = reinterpret_cast<const int32_t*>(p); })
      .def_readwrite("slot_stride", &LoraSiteView::slot_stride)
      .def_readwrite("rank_slot_stride", &LoraSiteView::rank_slot_stride)
      .def_readwrite("num_slots", &LoraSiteView::num_slots)
      .def_readwrite("num_experts", &LoraSiteView::num_experts)
      .def_readwrite("max_rank", &LoraSiteView::max_rank)
      .def_readwrite("in_dim", &LoraSiteView::in_dim)
      .def_readwrite("out_dim", &LoraSiteView::out_dim)
      .def_property(
          "dtype", [](const LoraSiteView& v) { return static_cast<int>(v.dtype); },
          [](LoraSiteView& v, int code) {
            dtype_size(static_cast<DType>(code));
            v.dtype = static_cast<DType>(code);
          })
      .def("__repr__", [](const LoraSiteView& v) {
        return "LoraSiteView(num_slots=" + std::to_string(v.num_slots) +
               ", num_experts=" + std::to_string(v.num_experts) +
               ", max_rank=" + std::to_string(v.max_rank) + ", in_dim=" +
               std::to_string(v.in_dim) + ", out_dim=" + std::to_string(v.out_dim) +
               ", dtype=" + dtype_name(v.dtype) + ")";
      });

  py::class_<KvCacheView>(m, "KvCacheView", py::dynamic_attr())
      .def(py::init([](uintptr_t arena, int64_t page_bytes, int32_t block_tokens,
                       int32_t num_kv_heads, int32_t head_dim, int dtype) {
             KvCacheView v;
             v.arena = reinterpret_cast<std::byte*>(arena);
             v.page_bytes = page_bytes;
             v.block_tokens = block_tokens;
             v.num_kv_heads = num_kv_heads;
             v.head_dim = head_dim;
             v.dtype = static_cast<DType>(dtype);
             dtype_size(v.dtype);
             return v;
           }),
           py::kw_only(), py::arg("arena") = 0, py::arg("page_bytes") = 0,
           py::arg("block_tokens") = 0, py::arg("num_kv_heads") = 0, py::arg("head_dim") = 0,
           py::arg("dtype") = 0)
      .def_property(
          "arena", [](const KvCacheView& v) { return as_int(v.arena); },
          [](KvCacheView& v, uintptr_t p) { v.arena = reinterpret_cast<std::byte*>(p); })
      .def_readwrite("page_bytes", &KvCacheView::page_bytes)
      .def_readwrite("block_tokens", &KvCacheView::block_tokens)
      .def_readwrite("num_kv_heads", &KvCacheView::num_kv_heads)
      .def_readwrite("head_dim", &KvCacheView::head_dim)
      .def_property(
          "dtype", [](const KvCacheView& v) { return static_cast<int>(v.dtype); },
          [](KvCacheView& v, int code) {
            dtype_size(static_cast<DType>(code));
            v.dtype = static_cast<DType>(code);
          });
}

}  // namespace

void register_ops(py::module_& m) {
  register_plan(m);
  register_views(m);
  m.def("kv_page_bytes_needed", [](int32_t block_tokens, int32_t num_kv_heads, int32_t head_dim,
                                   int dtype) {
    return kv_page_bytes_needed(block_tokens, num_kv_heads, head_dim, static_cast<DType>(dtype));
  });
  m.def("moe_lora_align_max_blocks", &moe_lora_align_max_blocks, py::arg("num_pairs"),
        py::arg("num_experts"), py::arg("num_slots"), py::arg("block_m"));

  m.def(
      "moe_lora_align_workspace_bytes",
      [](int64_t num_pairs, int32_t num_experts, int32_t num_slots, bool cuda,
         const LoraPlan* plan) {
        return moe_lora_align_workspace_bytes(num_pairs, num_experts, num_slots,
                                              cuda ? DeviceKind::kCUDA : DeviceKind::kCPU, plan);
      },
      py::arg("num_pairs"), py::arg("num_experts"), py::arg("num_slots"), py::arg("cuda"),
      py::arg("plan") = py::none());

  m.def(
      "moe_lora_align",
      [](const py::object& topk_ids, const py::tuple& token_slot, int32_t num_experts,
         int32_t num_slots, int32_t block_m, const py::tuple& sorted_pairs,
         const py::tuple& block_slot, const py::tuple& block_expert, const py::tuple& num_blocks,
         uintptr_t stream, const py::object& workspace, const LoraPlan* plan) {
        MoeLoraAlignArgs a;
        a.topk_ids = to_optional_tensor_ref(topk_ids, "topk_ids");
        a.token_slot = to_tensor_ref(token_slot, "token_slot");
        a.num_experts = num_experts;
        a.num_slots = num_slots;
        a.block_m = block_m;
        a.sorted_pairs = to_tensor_ref(sorted_pairs, "sorted_pairs");
        a.block_slot = to_tensor_ref(block_slot, "block_slot");
        a.block_expert = to_tensor_ref(block_expert, "block_expert");
        a.num_blocks = to_tensor_ref(num_blocks, "num_blocks");
        a.workspace = to_optional_tensor_ref(workspace, "workspace");
        py::gil_scoped_release release;
        moe_lora_align(a, stream_from_int(stream), plan);
      },
      py::arg("topk_ids"), py::arg("token_slot"), py::arg("num_experts"), py::arg("num_slots"),
      py::arg("block_m"), py::arg("sorted_pairs"), py::arg("block_slot"),
      py::arg("block_expert"), py::arg("num_blocks"), py::arg("stream"),
      py::arg("workspace") = py::none(), py::arg("plan") = py::none());

  // fused_moe_lora, fused_moe_lora_unsorted and dense_lora: one FusedMoeLoraArgs, built here
  // from keywords; each op reads the fields of its form (absent tensors: None).
  const auto lora_op = [&m](const char* name, LoraOp op) {
    m.def(
        name,
        [op](const py::tuple& input, const py::tuple& output,
             const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
             uintptr_t stream, int32_t input_pairs_per_row, const py::object& topk_weights,
             const py::object& sorted_pairs, const py::object& block_slot,
             const py::object& block_expert, const py::object& num_blocks, int32_t block_m,
             const py::object& topk_ids, const py::object& token_slot, int64_t active_slots,
             const LoraPlan* plan) {
          FusedMoeLoraArgs a;
          a.input = to_tensor_ref(input, "input");
          a.output = to_tensor_ref(output, "output");
          a.slices = slices;
          a.col_offsets = col_offsets;
          a.input_pairs_per_row = input_pairs_per_row;
          a.topk_weights = to_optional_tensor_ref(topk_weights, "topk_weights");
          a.sorted_pairs = to_optional_tensor_ref(sorted_pairs, "sorted_pairs");
          a.block_slot = to_optional_tensor_ref(block_slot, "block_slot");
          a.block_expert = to_optional_tensor_ref(block_expert, "block_expert");
          a.num_blocks = to_optional_tensor_ref(num_blocks, "num_blocks");
          a.block_m = block_m;
          a.topk_ids = to_optional_tensor_ref(topk_ids, "topk_ids");
          a.token_slot = to_optional_tensor_ref(token_slot, "token_slot");
          a.active_slots = active_slots;
          py::gil_scoped_release release;
          op(a, stream_from_int(stream), plan);
        },
        py::arg("input"), py::arg("output"), py::arg("slices"), py::arg("col_offsets"),
        py::arg("stream"), py::kw_only(), py::arg("input_pairs_per_row") = 1,
        py::arg("topk_weights") = py::none(), py::arg("sorted_pairs") = py::none(),
        py::arg("block_slot") = py::none(), py::arg("block_expert") = py::none(),
        py::arg("num_blocks") = py::none(), py::arg("block_m") = 0,
        py::arg("topk_ids") = py::none(), py::arg("token_slot") = py::none(),
        py::arg("active_slots") = 0, py::arg("plan") = py::none());
  };
  lora_op("fused_moe_lora", &fused_moe_lora);
  lora_op("fused_moe_lora_unsorted", &fused_moe_lora_unsorted);
  lora_op("dense_lora", &dense_lora);

  m.def("kv_cache_write", [](const py::tuple& key, const py::tuple& value,
                             const py::tuple& slot_mapping, const KvCacheView& cache,
                             uintptr_t stream) {
    TensorRef k = to_tensor_ref(key, "key");
    TensorRef v = to_tensor_ref(value, "value");
    TensorRef slots = to_tensor_ref(slot_mapping, "slot_mapping");
    py::gil_scoped_release release;
    kv_cache_write(k, v, slots, cache, stream_from_int(stream));
  });

  m.def(
      "paged_attention",
      [](const py::tuple& out, const py::tuple& query, const py::tuple& query_seq,
         const py::tuple& query_pos, const py::tuple& block_table, const py::tuple& seq_lens,
         const KvCacheView& cache, float scale, int32_t sliding_window, const py::object& sinks,
         uintptr_t stream, const AttentionPlan* plan) {
        PagedAttentionArgs a;
        a.out = to_tensor_ref(out, "out");
        a.query = to_tensor_ref(query, "query");
        a.query_seq = to_tensor_ref(query_seq, "query_seq");
        a.query_pos = to_tensor_ref(query_pos, "query_pos");
        a.block_table = to_tensor_ref(block_table, "block_table");
        a.seq_lens = to_tensor_ref(seq_lens, "seq_lens");
        a.cache = cache;
        a.scale = scale;
        a.sliding_window = sliding_window;
        a.sinks = to_optional_tensor_ref(sinks, "sinks");
        py::gil_scoped_release release;
        paged_attention(a, stream_from_int(stream), plan);
      },
      py::arg("out"), py::arg("query"), py::arg("query_seq"), py::arg("query_pos"),
      py::arg("block_table"), py::arg("seq_lens"), py::arg("cache"), py::arg("scale"),
      py::arg("sliding_window"), py::arg("sinks"), py::arg("stream"),
      py::arg("plan") = py::none());
}

}  // namespace moelora::bindings
