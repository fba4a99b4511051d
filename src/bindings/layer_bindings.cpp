// Bindings of moelora/layer.h: each op as _C.<op>(...) over tensor refs made by
// moelora._tensor.as_ref (None for an absent optional tensor). Checks live in the library; the
// binding converts and calls with the GIL released.
#include "bindings/common.h"

#include <cstdint>

#include "moelora/layer.h"

namespace moelora::bindings {

void register_layer(py::module_& m) {
  m.attr("ROPE_MAX_HEAD_DIM") = kRopeMaxHeadDim;

  m.def("rms_norm", [](const py::tuple& input, const py::tuple& weight, float eps,
                       const py::tuple& out, uintptr_t stream) {
    TensorRef in = to_tensor_ref(input, "input");
    TensorRef w = to_tensor_ref(weight, "weight");
    TensorRef o = to_tensor_ref(out, "out");
    py::gil_scoped_release release;
    rms_norm(in, w, eps, o, stream_from_int(stream));
  });

  m.def("add_rms_norm", [](const py::tuple& input, const py::tuple& residual,
                           const py::tuple& weight, float eps, const py::tuple& out,
                           uintptr_t stream) {
    TensorRef in = to_tensor_ref(input, "input");
    TensorRef res = to_tensor_ref(residual, "residual");
    TensorRef w = to_tensor_ref(weight, "weight");
    TensorRef o = to_tensor_ref(out, "out");
    py::gil_scoped_release release;
    add_rms_norm(in, res, w, eps, o, stream_from_int(stream));
  });

  m.def("rope_qk", [](const py::tuple& query, const py::tuple& key, const py::tuple& positions,
                      const py::tuple& inv_freq, float attention_scaling,
                      const py::object& q_norm, const py::object& k_norm, float norm_eps,
                      uintptr_t stream) {
    TensorRef q = to_tensor_ref(query, "query");
    TensorRef k = to_tensor_ref(key, "key");
    TensorRef pos = to_tensor_ref(positions, "positions");
    TensorRef freq = to_tensor_ref(inv_freq, "inv_freq");
    TensorRef qn = to_optional_tensor_ref(q_norm, "q_norm");
    TensorRef kn = to_optional_tensor_ref(k_norm, "k_norm");
    py::gil_scoped_release release;
    rope_qk(q, k, pos, freq, attention_scaling, qn, kn, norm_eps, stream_from_int(stream));
  });

  m.def("rope_kv_write", [](const py::tuple& query, const py::tuple& key, const py::tuple& value,
                            const py::tuple& positions, const py::tuple& inv_freq,
                            float attention_scaling, const py::object& q_norm,
                            const py::object& k_norm, float norm_eps,
                            const py::tuple& slot_mapping, const KvCacheView& cache,
                            uintptr_t stream) {
    TensorRef q = to_tensor_ref(query, "query");
    TensorRef k = to_tensor_ref(key, "key");
    TensorRef v = to_tensor_ref(value, "value");
    TensorRef pos = to_tensor_ref(positions, "positions");
    TensorRef freq = to_tensor_ref(inv_freq, "inv_freq");
    TensorRef qn = to_optional_tensor_ref(q_norm, "q_norm");
    TensorRef kn = to_optional_tensor_ref(k_norm, "k_norm");
    TensorRef slots = to_tensor_ref(slot_mapping, "slot_mapping");
    py::gil_scoped_release release;
    rope_kv_write(q, k, v, pos, freq, attention_scaling, qn, kn, norm_eps, slots, cache,
                  stream_from_int(stream));
  });
}

}  // namespace moelora::bindings
