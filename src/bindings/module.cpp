// The moelora._C module: library errors become Python exceptions of the same name, then each
// component registers its own functions.
#include <pybind11/pybind11.h>

#include "bindings/common.h"
#include "moelora/runtime.h"

namespace py = pybind11;
using namespace moelora;

namespace moelora::bindings {

TensorRef to_tensor_ref(const py::tuple& ref, const char* arg_name) {
  if (ref.size() != 6) {
    throw InvalidArgument(std::string(arg_name) +
                          ": expected a tensor reference (ptr, dtype, shape, strides, device, "
                          "index) made by moelora._tensor.as_ref");
  }
  TensorRef t;
  t.data = reinterpret_cast<void*>(ref[0].cast<uintptr_t>());
  t.dtype = static_cast<DType>(ref[1].cast<int>());
  auto shape = ref[2].cast<py::tuple>();
  auto stride = ref[3].cast<py::tuple>();
  if (shape.size() > TensorRef::kMaxDims || shape.size() != stride.size()) {
    throw InvalidArgument(std::string(arg_name) + ": bad shape/stride rank");
  }
  t.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i].cast<int64_t>();
    t.stride[i] = stride[i].cast<int64_t>();
  }
  t.device = static_cast<DeviceKind>(ref[4].cast<int>());
  t.device_index = ref[5].cast<int>();
  dtype_size(t.dtype);  // validates the dtype code
  return t;
}

TensorRef to_optional_tensor_ref(const py::object& ref, const char* arg_name) {
  if (ref.is_none()) return TensorRef{};
  return to_tensor_ref(ref.cast<py::tuple>(), arg_name);
}

void check_dtype(const TensorRef& t, DType dtype, const char* arg_name) {
  if (t.dtype != dtype) {
    throw InvalidArgument(std::string(arg_name) + " must be " + dtype_name(dtype) + ", got " +
                          t.describe());
  }
}

void check_ndim(const TensorRef& t, int ndim, const char* arg_name) {
  if (t.ndim != ndim) {
    throw InvalidArgument(std::string(arg_name) + " must have " + std::to_string(ndim) +
                          " dimensions, got " + t.describe());
  }
}

void check_same_device(const TensorRef& a, const TensorRef& b, const char* a_name,
                       const char* b_name) {
  if (a.device != b.device || a.device_index != b.device_index) {
    throw InvalidArgument(std::string(a_name) + " and " + b_name +
                          " must be on the same device: " + a.describe() + " vs " +
                          b.describe());
  }
}

void* stream_from_int(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

DType dtype_from_object(const py::object& dtype) {
  if (py::isinstance<py::int_>(dtype)) {
    const auto code = static_cast<DType>(dtype.cast<int>());
    dtype_size(code);  // validates the code
    return code;
  }
  std::string name = py::str(dtype).cast<std::string>();
  const std::string torch_prefix = "torch.";
  if (name.rfind(torch_prefix, 0) == 0) name = name.substr(torch_prefix.size());
  return parse_dtype(name);
}

}  // namespace moelora::bindings

PYBIND11_MODULE(_C, m) {
  m.doc() = "libmoelora: unified page pool, adapter cache and MoE-LoRA kernels";

  // One Python class per error kind, all deriving from MoeloraError (a RuntimeError).
  // Translators run newest first, so the base is registered before the specific kinds.
  auto base_error = py::register_exception<Error>(m, "MoeloraError", PyExc_RuntimeError);
  py::register_exception<InvalidArgument>(m, "InvalidArgument", base_error.ptr());
  py::register_exception<PoolExhausted>(m, "PoolExhausted", base_error.ptr());
  py::register_exception<AdapterError>(m, "AdapterError", base_error.ptr());
  py::register_exception<NotFound>(m, "NotFound", base_error.ptr());
  py::register_exception<IoError>(m, "IoError", base_error.ptr());
  py::register_exception<CudaError>(m, "CudaError", base_error.ptr());
  py::register_exception<Cancelled>(m, "Cancelled", base_error.ptr());
  py::register_exception<InternalError>(m, "InternalError", base_error.ptr());

  m.def("version", &version, "libmoelora's version string");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("cuda_available", &cuda_available);
  m.def("cuda_device_count", &cuda_device_count);
  m.def(
      "preload_cuda_kernels",
      [] {
        KernelPreload p;
        {
          py::gil_scoped_release released;
          p = preload_cuda_kernels();
        }
        py::dict out;
        out["modules"] = p.modules;
        out["kernels"] = p.kernels;
        out["newly_loaded"] = p.newly_loaded;
        return out;
      },
      "Loads every kernel of libmoelora on the current CUDA device (see moelora/runtime.h); "
      "returns {modules, kernels, newly_loaded}");

  moelora::bindings::register_pool(m);
  moelora::bindings::register_adapter_cache(m);
  moelora::bindings::register_ops(m);
  moelora::bindings::register_layer(m);
  moelora::bindings::register_moe(m);
}
