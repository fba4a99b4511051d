// Internal: argument checks shared by the ops. Each throws InvalidArgument with a message that
// starts with the op and names the offending argument, e.g.
//   "fused_moe_lora: output must be float16 like input, got bfloat16[7, 74] strides [74, 1] on cpu"
// The static checks (dtypes, shapes, devices) run before dispatch, so the CPU and CUDA paths
// reject the same calls. Checks that read tensor contents (slot and pair ids) live in the CPU
// kernels, which read those values anyway.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moelora/ops.h"
#include "moelora/row_layout.h"
#include "moelora/tensor_ref.h"

namespace moelora::kernels {

[[noreturn]] void throw_invalid(const char* op, const std::string& problem);
// "<op>: this build has no CUDA backend", for device tensors in a CPU-only build.
[[noreturn]] void no_cuda_kernel(const char* op);

inline bool on_cuda(const TensorRef& t) { return t.device == DeviceKind::kCUDA; }

// An "empty" optional tensor: no data and no dimensions (what None becomes in the binding).
inline bool is_absent(const TensorRef& t) { return t.data == nullptr && t.ndim == 0; }

void check_dtype(const TensorRef& t, DType dtype, const char* op, const char* arg);
void check_float_dtype(const TensorRef& t, const char* op, const char* arg);
void check_ndim(const TensorRef& t, int ndim, const char* op, const char* arg);
void check_size(const TensorRef& t, int dim, int64_t expected, const char* op, const char* arg,
                const char* what);
void check_same_device(const TensorRef& a, const TensorRef& b, const char* op, const char* a_arg,
                       const char* b_arg);
void check_last_dim_contiguous(const TensorRef& t, const char* op, const char* arg);
// Non-empty tensors must carry a data pointer.
void check_has_data(const TensorRef& t, const char* op, const char* arg);
void check_block_m(int32_t block_m, const char* op);

// The LoRA site views against the input and output they are applied to: same count as
// col_offsets, dtype of the activations, in_dim == input width, and each slice's columns
// [col_offset, col_offset + out_dim) inside the output's width.
void check_site_views(const std::vector<LoraSiteView>& slices,
                      const std::vector<int64_t>& col_offsets, int64_t input_width,
                      int64_t output_width, DType activation_dtype, const char* op);

// The (sorted_pairs, block_slot, block_expert, num_blocks) metadata produced by moe_lora_align.
// block_expert may be absent (dense LoRA). Returns nothing; shapes only.
void check_block_metadata(const TensorRef& sorted_pairs, const TensorRef& block_slot,
                          const TensorRef& block_expert, const TensorRef& num_blocks,
                          int32_t block_m, const char* op, const char* pairs_arg);

void check_kv_cache_view(const KvCacheView& cache, const char* op);

}  // namespace moelora::kernels
