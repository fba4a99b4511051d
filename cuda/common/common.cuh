// Internal helpers shared by the CUDA kernels in cuda/: element conversion to and from float32,
// 16-byte vector loads and stores of 16-bit or 32-bit elements, device properties read at run
// time (cached per device), and launch error checks. No torch, no Python.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_check.h"
#include "moelora/dtype.h"
#include "moelora/error.h"
#include "moelora/tensor_ref.h"

namespace moelora::cuda::detail {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Loads N consecutive elements (N = 1 or kVec16<T>) as float32; N > 1 needs 16-byte alignment.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* src, float (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = to_f32(src[0]);
  } else {
    static_assert(N * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_f32(elems[i]);
  }
}

// Streaming variant for weights read once per step: do not keep them in L1.
template <typename T, int N>
__device__ __forceinline__ void load_f32_stream(const T* src, float (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = to_f32(__ldg(src));
  } else {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(src));
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_f32(elems[i]);
  }
}

// Bytes of one vector of VEC elements of T.
template <typename T, int VEC>
constexpr int kVecBytes = VEC * static_cast<int>(sizeof(T));

// Raw storage of one vector of VEC elements: 16-byte vectors travel as uint4, scalars as T.
template <typename T, int VEC>
using RawVec = std::conditional_t<kVecBytes<T, VEC> == 16, uint4, T>;

// The elements of a raw vector as float32. By value: a vector staged in shared memory is then
// read with one 16-byte load (through a reference the compiler reads it element by element: 8
// ld.shared.u16 per bf16 vector).
template <typename T, int VEC>
__device__ __forceinline__ void raw_to_f32(const RawVec<T, VEC> raw, float (&dst)[VEC]) {
  T elems[VEC];
  memcpy(elems, &raw, sizeof(elems));
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_f32(elems[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_from_f32(T* dst, const float (&src)[N]) {
  if constexpr (N == 1) {
    dst[0] = from_f32<T>(src[0]);
  } else {
    uint4 raw;
    T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) elems[i] = from_f32<T>(src[i]);
    *reinterpret_cast<uint4*>(dst) = raw;
  }
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Whether every row of a 2-D tensor starts on a 16-byte boundary (its data and its row stride),
// so that rows may be read and written in 16-byte vectors. A tensor without data qualifies.
inline bool rows_aligned16(const TensorRef& t) {
  return t.data == nullptr ||
         (aligned16(t.data) && (t.stride[0] * static_cast<int64_t>(dtype_size(t.dtype))) % 16 == 0);
}

// Multiprocessor count and compute capability (major) of the current device, read once per
// device.
int sm_count();
int compute_capability_major();
// Whether the current device runs cooperative launches (grid-wide barriers), read once.
bool cooperative_launch();

// Lets `kernel` launch with up to `bytes` of dynamic shared memory on the current device. The
// limit only ever rises (under a lock): host threads launching one kernel with different sizes
// must not lower each other's limit between the call and the launch.
void allow_dynamic_smem(const void* kernel, size_t bytes);
template <typename... Params>
void allow_dynamic_smem(void (*kernel)(Params...), size_t bytes) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// Stream-ordered scratch memory (cudaMallocAsync / cudaFreeAsync; graph-capturable). The
// device's default pool otherwise hands freed memory back at every synchronisation and maps it
// again on the next call: the multi-CTA align's 1 MB of counters cost ~300 us per eager call on
// the H200 that way. The first call on a device lets its default pool keep up to
// kRetainedScratchBytes reserved.
void* scratch_alloc(size_t bytes, cudaStream_t stream);
void scratch_free(void* ptr, cudaStream_t stream);

// Throws CudaError when the last launch failed.
void check_launch(const char* what);

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace moelora::cuda::detail

// Calls F.template operator()<T>() with T the CUDA element type of a float dtype.
#define MOELORA_DISPATCH_FLOAT(dtype, T, ...)                                    \
  switch (dtype) {                                                               \
    case ::moelora::DType::kFloat32: {                                           \
      using T = float;                                                           \
      __VA_ARGS__;                                                               \
    } break;                                                                     \
    case ::moelora::DType::kFloat16: {                                           \
      using T = __half;                                                          \
      __VA_ARGS__;                                                               \
    } break;                                                                     \
    case ::moelora::DType::kBFloat16: {                                          \
      using T = __nv_bfloat16;                                                   \
      __VA_ARGS__;                                                               \
    } break;                                                                     \
    default:                                                                     \
      throw ::moelora::InvalidArgument(std::string("unsupported dtype ") +       \
                                       ::moelora::dtype_name(dtype));            \
  }
