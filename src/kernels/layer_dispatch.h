// Internal: the per-device implementations behind the ops of moelora/layer.h. layer_ops.cpp
// validates the arguments once, then calls cpu::<op> for host tensors or cuda::<op> (cuda/layer/)
// for device tensors; both take already validated arguments.
#pragma once

#include "moelora/layer.h"

namespace moelora {

namespace cpu {

// residual absent: plain rms_norm.
void rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
              float eps, const TensorRef& out);

// value / slot_mapping / cache absent (cache == nullptr): rope_qk.
void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView* cache);

}  // namespace cpu

#ifdef MOELORA_WITH_CUDA
namespace cuda {

void rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
              float eps, const TensorRef& out, void* stream);

void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView* cache, void* stream);

}  // namespace cuda
#endif

}  // namespace moelora
