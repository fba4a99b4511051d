// Shared helpers of the pybind11 module: tensor views from Python, stream handles.
// The module links no libtorch: Python passes (data_ptr, dtype code, shape, strides, device
// type, device index) tuples made by moelora._tensor.as_ref, and raw stream handles as ints.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "moelora/error.h"
#include "moelora/tensor_ref.h"

namespace moelora::bindings {

namespace py = pybind11;

// (data_ptr, dtype_code, shape tuple, stride tuple, device_type 0=cpu 1=cuda, device_index)
TensorRef to_tensor_ref(const py::tuple& ref, const char* arg_name);
// Optional tensor: None gives a TensorRef with data == nullptr and ndim == 0.
TensorRef to_optional_tensor_ref(const py::object& ref, const char* arg_name);

// Argument checks that name the argument in the error.
void check_dtype(const TensorRef& t, DType dtype, const char* arg_name);
void check_ndim(const TensorRef& t, int ndim, const char* arg_name);
void check_same_device(const TensorRef& a, const TensorRef& b, const char* a_name,
                       const char* b_name);
void* stream_from_int(uintptr_t stream);
// A DType from its code, a name ("bfloat16", "BF16") or a torch dtype ("torch.bfloat16").
DType dtype_from_object(const py::object& dtype);

void register_pool(py::module_& m);
void register_adapter_cache(py::module_& m);
void register_ops(py::module_& m);
void register_layer(py::module_& m);
void register_moe(py::module_& m);

}  // namespace moelora::bindings
