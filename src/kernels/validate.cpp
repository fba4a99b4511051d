// Argument checks shared by the ops; see validate.h.
#include "kernels/validate.h"

#include "moelora/error.h"

namespace moelora::kernels {

void throw_invalid(const char* op, const std::string& problem) {
  throw InvalidArgument(std::string(op) + ": " + problem);
}

void no_cuda_kernel(const char* op) { throw_invalid(op, "this build has no CUDA backend"); }

void check_dtype(const TensorRef& t, DType dtype, const char* op, const char* arg) {
  if (t.dtype != dtype) {
    throw_invalid(op, std::string(arg) + " must be " + dtype_name(dtype) + ", got " +
                          t.describe());
  }
}

void check_float_dtype(const TensorRef& t, const char* op, const char* arg) {
  if (t.dtype != DType::kFloat32 && t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16) {
    throw_invalid(op, std::string(arg) + " must be float32, float16 or bfloat16, got " +
                          t.describe());
  }
}

void check_ndim(const TensorRef& t, int ndim, const char* op, const char* arg) {
  if (t.ndim != ndim) {
    throw_invalid(op, std::string(arg) + " must have " + std::to_string(ndim) +
                          " dimension(s), got " + t.describe());
  }
}

void check_size(const TensorRef& t, int dim, int64_t expected, const char* op, const char* arg,
                const char* what) {
  if (t.shape[dim] != expected) {
    throw_invalid(op, std::string(arg) + " dimension " + std::to_string(dim) + " must be " +
                          std::to_string(expected) + " (" + what + "), got " + t.describe());
  }
}

void check_same_device(const TensorRef& a, const TensorRef& b, const char* op, const char* a_arg,
                       const char* b_arg) {
  if (a.device != b.device || a.device_index != b.device_index) {
    throw_invalid(op, std::string(a_arg) + " and " + b_arg + " must be on the same device: " +
                          a.describe() + " vs " + b.describe());
  }
}

void check_last_dim_contiguous(const TensorRef& t, const char* op, const char* arg) {
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.stride[t.ndim - 1] != 1) {
    throw_invalid(op, std::string(arg) + " must be contiguous in its last dimension, got " +
                          t.describe());
  }
}

void check_has_data(const TensorRef& t, const char* op, const char* arg) {
  if (t.data == nullptr && t.numel() > 0) {
    throw_invalid(op, std::string(arg) + " has no data pointer: " + t.describe());
  }
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] < 0) throw_invalid(op, std::string(arg) + " has a negative size");
  }
}

void check_block_m(int32_t block_m, const char* op) {
  if (block_m <= 0) {
    throw_invalid(op, "block_m must be positive, got " + std::to_string(block_m));
  }
}

void check_site_views(const std::vector<LoraSiteView>& slices,
                      const std::vector<int64_t>& col_offsets, int64_t input_width,
                      int64_t output_width, DType activation_dtype, const char* op) {
  if (slices.empty()) throw_invalid(op, "slices must hold at least one LoraSiteView");
  if (slices.size() != col_offsets.size()) {
    throw_invalid(op, "col_offsets has " + std::to_string(col_offsets.size()) +
                          " entries but slices has " + std::to_string(slices.size()));
  }
  for (size_t i = 0; i < slices.size(); ++i) {
    const LoraSiteView& view = slices[i];
    std::string name = "slices[" + std::to_string(i) + "]";
    if (view.dtype != activation_dtype) {
      throw_invalid(op, name + ".dtype is " + dtype_name(view.dtype) + " but the activations are " +
                            dtype_name(activation_dtype));
    }
    if (view.in_dim != input_width) {
      throw_invalid(op, name + ".in_dim is " + std::to_string(view.in_dim) +
                            " but input has width " + std::to_string(input_width));
    }
    if (view.out_dim <= 0 || view.max_rank < 0 || view.num_slots < 0 || view.num_experts <= 0) {
      throw_invalid(op, name + " has non-positive out_dim/num_experts or negative max_rank/" +
                            "num_slots (out_dim " + std::to_string(view.out_dim) + ", max_rank " +
                            std::to_string(view.max_rank) + ")");
    }
    if (view.num_slots > 0 && (view.arena == nullptr || view.row_offsets == nullptr ||
                               view.ranks == nullptr)) {
      throw_invalid(op, name + " has a null arena, row_offsets or ranks pointer");
    }
    if (col_offsets[i] < 0 || col_offsets[i] + view.out_dim > output_width) {
      throw_invalid(op, "col_offsets[" + std::to_string(i) + "] + " + name + ".out_dim = " +
                            std::to_string(col_offsets[i]) + " + " +
                            std::to_string(view.out_dim) + " exceeds the output width " +
                            std::to_string(output_width));
    }
  }
}

void check_block_metadata(const TensorRef& sorted_pairs, const TensorRef& block_slot,
                          const TensorRef& block_expert, const TensorRef& num_blocks,
                          int32_t block_m, const char* op, const char* pairs_arg) {
  check_block_m(block_m, op);
  check_dtype(sorted_pairs, DType::kInt32, op, pairs_arg);
  check_ndim(sorted_pairs, 1, op, pairs_arg);
  check_has_data(sorted_pairs, op, pairs_arg);
  check_dtype(block_slot, DType::kInt32, op, "block_slot");
  check_ndim(block_slot, 1, op, "block_slot");
  check_has_data(block_slot, op, "block_slot");
  check_same_device(sorted_pairs, block_slot, op, pairs_arg, "block_slot");
  if (!is_absent(block_expert)) {
    check_dtype(block_expert, DType::kInt32, op, "block_expert");
    check_ndim(block_expert, 1, op, "block_expert");
    check_has_data(block_expert, op, "block_expert");
    check_size(block_expert, 0, block_slot.shape[0], op, "block_expert", "one per block");
    check_same_device(sorted_pairs, block_expert, op, pairs_arg, "block_expert");
  }
  check_dtype(num_blocks, DType::kInt32, op, "num_blocks");
  check_ndim(num_blocks, 1, op, "num_blocks");
  check_size(num_blocks, 0, 1, op, "num_blocks", "a single count");
  check_has_data(num_blocks, op, "num_blocks");
  check_same_device(sorted_pairs, num_blocks, op, pairs_arg, "num_blocks");
  if (sorted_pairs.shape[0] != block_slot.shape[0] * block_m) {
    throw_invalid(op, std::string(pairs_arg) + " must hold block_m * len(block_slot) = " +
                          std::to_string(block_slot.shape[0] * block_m) + " entries, got " +
                          sorted_pairs.describe());
  }
}

void check_kv_cache_view(const KvCacheView& cache, const char* op) {
  if (cache.arena == nullptr) throw_invalid(op, "cache.arena is null");
  if (cache.block_tokens <= 0 || cache.num_kv_heads <= 0 || cache.head_dim <= 0) {
    throw_invalid(op, "cache.block_tokens, cache.num_kv_heads and cache.head_dim must be "
                      "positive, got " + std::to_string(cache.block_tokens) + ", " +
                          std::to_string(cache.num_kv_heads) + ", " +
                          std::to_string(cache.head_dim));
  }
  if (cache.dtype != DType::kFloat32 && cache.dtype != DType::kFloat16 &&
      cache.dtype != DType::kBFloat16) {
    throw_invalid(op, std::string("cache.dtype must be float32, float16 or bfloat16, got ") +
                          dtype_name(cache.dtype));
  }
  int64_t needed =
      kv_page_bytes_needed(cache.block_tokens, cache.num_kv_heads, cache.head_dim, cache.dtype);
  if (cache.page_bytes < needed) {
    throw_invalid(op, "cache.page_bytes " + std::to_string(cache.page_bytes) + " < " +
                          std::to_string(needed) + " bytes needed for K and V of a block");
  }
}

}  // namespace moelora::kernels
