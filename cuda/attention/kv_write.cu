// kv_cache_write on the GPU: one CTA per token copies its K and V rows (all kv heads) into its
// cache slot: page slot / block_tokens, offset slot % block_tokens (attention/attention.cuh has
// the page layout). Slot -1 skips the token.
#include "attention/attention.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/dispatch.h"

namespace moelora::cuda {

namespace {

template <typename T>
__global__ void kv_cache_write_kernel(const T* key, int64_t key_s0, int64_t key_s1,
                                      const T* value, int64_t value_s0, int64_t value_s1,
                                      const int64_t* slot_mapping, int64_t slot_stride,
                                      KvLayout kv) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t * slot_stride];
  if (slot < 0) return;
  const int64_t page = slot / kv.block_tokens;
  const int64_t in_page = slot % kv.block_tokens;
  const int64_t row_elems = int64_t{kv.num_kv_heads} * kv.head_dim;
  for (int64_t i = threadIdx.x; i < row_elems; i += blockDim.x) {
    const int64_t g = i / kv.head_dim;
    const int64_t d = i % kv.head_dim;
    kv_row<T>(kv, page, in_page, g, false)[d] = key[t * key_s0 + g * key_s1 + d];
    kv_row<T>(kv, page, in_page, g, true)[d] = value[t * value_s0 + g * value_s1 + d];
  }
}

}  // namespace

void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream) {
  const int64_t num_tokens = key.shape[0];
  if (num_tokens == 0) return;
  const KvLayout kv = kv_layout(cache);
  const int64_t row_elems = int64_t{cache.num_kv_heads} * cache.head_dim;
  const int threads = static_cast<int>(detail::min64(256, (row_elems + 31) / 32 * 32));
  MOELORA_DISPATCH_FLOAT(cache.dtype, T, {
    kv_cache_write_kernel<T><<<static_cast<unsigned>(num_tokens), threads, 0,
                               detail::as_stream(stream)>>>(
        static_cast<const T*>(key.data), key.stride[0], key.stride[1],
        static_cast<const T*>(value.data), value.stride[0], value.stride[1],
        static_cast<const int64_t*>(slot_mapping.data), slot_mapping.stride[0], kv);
  });
  detail::check_launch("kv_cache_write");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
