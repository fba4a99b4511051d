// fused_moe_lora and dense_lora on the GPU: a Split-K shrink kernel and an expand kernel.
//
// Math, per block b (slot a, expert e, up to block_m pairs) and slice i of rank r = rank_i(a):
//   shrink  s[p, k]    = sum_d x[p / input_pairs_per_row, d] * A_i[a, e][k, d]      (k < r)
//   expand  out[p, c_i + j] += w[p] * sum_k s[p, k] * B_i^T[a, e][k, j]
// with A rows and B^T rows read in place through the slice's row table, fp32 accumulation and
// one rounding per output element (the CPU reference's order of operations).
//
// Shrink: grid (splits, max_blocks, slices), 256 threads. A CTA owns one in_dim chunk (at most
//   kMaxChunk elements) of one (block, slice): it stages the chunk of MT input rows in shared
//   memory as fp32, then each warp takes rank rows k = warp, warp + 8, ... and streams that A
//   row chunk with 16-byte loads (lane l reads elements 8l.. of each 256-element step), FMAs it
//   against the MT staged rows, and reduces across lanes. The partial sums go to a stream-
//   ordered fp32 workspace [slices][splits][max_blocks * block_m][rank_stride]; no atomics, so
//   repeated runs are bit-identical. Split-K sizes the grid to ~2 waves of the SMs (read at run
//   time) when there are few blocks (decode) and to ceil(in_dim / kMaxChunk) otherwise.
// Expand: grid (column tiles, max_blocks, slices), one warp per CTA. A CTA owns 32 * VEC output
//   columns of one slice for every pair of one block, so each output element has one owner and
//   the += needs no atomics. Per tile of MT pairs it sums the split partials of s (times w) into
//   shared memory, then streams the r B^T rows of its columns (16-byte loads) into MT x VEC fp32
//   accumulators and read-modify-writes the output rows.
// Both are memory-bound at decode (bytes: the A and B rows of every (slot, expert) touched) and
// use CUDA cores; at prefill each weight vector is reused by MT rows in registers and the block's
// other tiles hit L2. Blocks past num_blocks (read on the device), slots of rank 0, padding rows
// (-1) and out-of-range ids do no work. Template space: dtype x {16-byte, scalar} x MT {2, 8}.
#include <algorithm>
#include <vector>

#include "common.cuh"
#include "kernels/dispatch.h"

namespace moelora::cuda {

namespace {

constexpr int kMaxSlices = 4;
constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int64_t kMaxChunk = 1024;  // in_dim elements per shrink CTA (fp32 staging: MT * 4 KB)
constexpr int64_t kMinChunk = 256;   // one warp step of 16-byte loads of a 16-bit row
static_assert(kMaxChunk % kMinChunk == 0, "chunks are whole warp steps");

struct SliceArgs {
  const std::byte* arena;
  const int64_t* row_offsets;  // [num_slots][num_experts][2][max_rank] bytes, slot_stride apart
  int64_t slot_stride;
  const int32_t* ranks;  // ranks[slot * rank_slot_stride]
  int64_t rank_slot_stride;
  int32_t num_slots, num_experts, max_rank;
  int64_t out_dim;
  int64_t col_offset;
};

struct LoraArgs {
  const void* input;  // [input_rows, in_dim] row stride input_stride
  int64_t input_stride, input_rows, in_dim;
  int32_t input_pairs_per_row;
  void* output;  // [num_pairs, width] row stride output_stride
  int64_t output_stride, num_pairs;
  const float* weights;  // [num_pairs] stride weight_stride, or null (w = 1)
  int64_t weight_stride;
  const int32_t* sorted_pairs;  // [max_blocks * block_m] stride pairs_stride, pad = -1
  int64_t pairs_stride;
  const int32_t* block_slot;  // [max_blocks]
  int64_t block_slot_stride;
  const int32_t* block_expert;  // [max_blocks], or null (expert 0: dense LoRA)
  int64_t block_expert_stride;
  const int32_t* num_blocks;  // [1]
  int32_t block_m;
  int32_t num_slices;
  SliceArgs slices[kMaxSlices];
  float* partials;  // [num_slices][splits][rows_total][rank_stride]
  int32_t splits;
  int64_t chunk;      // in_dim elements per split
  int64_t rows_total;  // max_blocks * block_m
  int32_t rank_stride;
};

// Slot, expert and rank of block b for slice i; rank 0 when the block has nothing to do.
struct BlockInfo {
  int32_t slot, expert, rank;
};

__device__ __forceinline__ BlockInfo block_info(const LoraArgs& a, int64_t b, const SliceArgs& s) {
  BlockInfo info{-1, 0, 0};
  if (b >= *a.num_blocks) return info;
  info.slot = a.block_slot[b * a.block_slot_stride];
  info.expert = a.block_expert != nullptr ? a.block_expert[b * a.block_expert_stride] : 0;
  if (info.slot < 0 || info.slot >= s.num_slots || info.expert < 0 ||
      info.expert >= s.num_experts) {
    return info;
  }
  const int32_t rank = s.ranks[info.slot * s.rank_slot_stride];
  info.rank = rank < 0 ? 0 : min(rank, s.max_rank);
  return info;
}

__device__ __forceinline__ const std::byte* lora_row(const SliceArgs& s, const BlockInfo& info,
                                                     bool is_b, int k) {
  return s.arena + s.row_offsets[info.slot * s.slot_stride +
                                 (int64_t{info.expert} * 2 + (is_b ? 1 : 0)) * s.max_rank + k];
}

// Valid pair ids of block b, packed to the front of pair_ids[block_m]; returns their count.
// Called by every thread of the CTA (warp 0 does the work); ends with a barrier.
__device__ int compact_block_pairs(const LoraArgs& a, int64_t b, int32_t* pair_ids) {
  __shared__ int count;
  if (threadIdx.x < 32) {
    int n = 0;
    for (int base = 0; base < a.block_m; base += 32) {
      const int j = base + static_cast<int>(threadIdx.x);
      int32_t pair = -1;
      if (j < a.block_m) pair = a.sorted_pairs[(b * a.block_m + j) * a.pairs_stride];
      const bool valid = pair >= 0 && pair < a.num_pairs &&
                         pair / a.input_pairs_per_row < a.input_rows;
      const unsigned mask = __ballot_sync(0xffffffffu, valid);
      if (valid) pair_ids[n + __popc(mask & ((1u << threadIdx.x) - 1u))] = pair;
      n += __popc(mask);
    }
    if (threadIdx.x == 0) count = n;
  }
  __syncthreads();
  return count;
}

// VEC consecutive elements as fp32; a row that is not 16-byte aligned falls back to scalars.
template <typename T, int VEC>
__device__ __forceinline__ void load_weights(const T* src, bool aligned, float (&dst)[VEC]) {
  if constexpr (VEC == 1) {
    dst[0] = detail::to_f32(__ldg(src));
  } else {
    if (aligned) {
      detail::load_f32<T, VEC>(src, dst);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) dst[i] = detail::to_f32(src[i]);
    }
  }
}

template <typename T, int VEC, int MT>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(const LoraArgs a) {
  extern __shared__ float shrink_smem[];
  const int slice_index = blockIdx.z;
  const SliceArgs& s = a.slices[slice_index];
  const int64_t b = blockIdx.y;
  const BlockInfo info = block_info(a, b, s);
  if (info.rank == 0) return;  // uniform over the CTA
  const int64_t k0 = int64_t{blockIdx.x} * a.chunk;
  const int64_t len = min(a.chunk, a.in_dim - k0);
  if (len <= 0) return;

  float* x_tile = shrink_smem;                                          // [MT][chunk]
  int32_t* pair_ids = reinterpret_cast<int32_t*>(shrink_smem + MT * a.chunk);  // [block_m]
  const int n = compact_block_pairs(a, b, pair_ids);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const T* input = static_cast<const T*>(a.input);
  float* partial_base = a.partials + ((int64_t{slice_index} * a.splits + blockIdx.x) * a.rows_total +
                                      b * a.block_m) * a.rank_stride;

  for (int m0 = 0; m0 < n; m0 += MT) {
    // Stage MT input rows of the chunk as fp32 (zeros past the block's last pair).
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const bool row_valid = m0 + m < n;
      const T* x = row_valid ? input + (pair_ids[m0 + m] / a.input_pairs_per_row) * a.input_stride + k0
                             : nullptr;
      for (int64_t e = int64_t{threadIdx.x} * VEC; e < len; e += kShrinkThreads * VEC) {
        float v[VEC];
        if (row_valid) {
          detail::load_f32<T, VEC>(x + e, v);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) x_tile[m * a.chunk + e + i] = v[i];
      }
    }
    __syncthreads();

    for (int k = warp; k < info.rank; k += kShrinkWarps) {
      const T* a_row = reinterpret_cast<const T*>(lora_row(s, info, false, k)) + k0;
      const bool aligned = detail::aligned16(a_row);
      float acc[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
#pragma unroll 2
      for (int64_t e = int64_t{lane} * VEC; e < len; e += 32 * VEC) {
        float w[VEC];
        load_weights<T, VEC>(a_row + e, aligned, w);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float* xs = x_tile + m * a.chunk + e;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[m] = fmaf(w[i], xs[i], acc[m]);
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float sum = detail::warp_sum(acc[m]);
        if (lane == 0 && m0 + m < n) partial_base[int64_t{m0 + m} * a.rank_stride + k] = sum;
      }
    }
    __syncthreads();
  }
}

template <typename T, int VEC, int MT>
__global__ void __launch_bounds__(32) lora_expand_kernel(const LoraArgs a) {
  extern __shared__ float expand_smem[];
  const int slice_index = blockIdx.z;
  const SliceArgs& s = a.slices[slice_index];
  const int64_t b = blockIdx.y;
  const BlockInfo info = block_info(a, b, s);
  if (info.rank == 0) return;
  const int64_t col = int64_t{blockIdx.x} * (32 * VEC) + threadIdx.x * VEC;
  if (int64_t{blockIdx.x} * (32 * VEC) >= s.out_dim) return;
  const bool col_valid = col < s.out_dim;  // VEC divides out_dim on the vector path

  float* s_tile = expand_smem;                                                   // [MT][rank]
  int32_t* pair_ids = reinterpret_cast<int32_t*>(expand_smem + MT * a.rank_stride);  // [block_m]
  const int n = compact_block_pairs(a, b, pair_ids);
  const int lane = threadIdx.x;
  const float* partial_base =
      a.partials + (int64_t{slice_index} * a.splits * a.rows_total + b * a.block_m) * a.rank_stride;
  const int64_t split_stride = a.rows_total * a.rank_stride;
  T* output = static_cast<T*>(a.output);

  for (int m0 = 0; m0 < n; m0 += MT) {
    for (int idx = lane; idx < MT * info.rank; idx += 32) {
      const int m = idx / info.rank;
      const int k = idx % info.rank;
      float v = 0.0f;
      if (m0 + m < n) {
        const float* p = partial_base + int64_t{m0 + m} * a.rank_stride + k;
        for (int sp = 0; sp < a.splits; ++sp) v += p[sp * split_stride];
        if (a.weights != nullptr) v *= a.weights[int64_t{pair_ids[m0 + m]} * a.weight_stride];
      }
      s_tile[m * a.rank_stride + k] = v;
    }
    __syncwarp();

    float acc[MT][VEC];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[m][i] = 0.0f;
    }
    if (col_valid) {
#pragma unroll 4
      for (int k = 0; k < info.rank; ++k) {
        const T* b_row = reinterpret_cast<const T*>(lora_row(s, info, true, k));
        float w[VEC];
        load_weights<T, VEC>(b_row + col, detail::aligned16(b_row), w);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float sk = s_tile[m * a.rank_stride + k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[m][i] = fmaf(sk, w[i], acc[m][i]);
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m0 + m < n) {
          T* y = output + int64_t{pair_ids[m0 + m]} * a.output_stride + s.col_offset + col;
          float cur[VEC];
          detail::load_f32<T, VEC>(y, cur);
#pragma unroll
          for (int i = 0; i < VEC; ++i) cur[i] += acc[m][i];
          detail::store_from_f32<T, VEC>(y, cur);
        }
      }
    }
    __syncwarp();
  }
}

// The expand's vector width must suit every slice's columns and the output rows.
template <typename T>
bool expand_vectorizable(const LoraArgs& a, const TensorRef& output) {
  constexpr int vec = detail::kVec16<T>;
  if (!detail::aligned16(output.data) || (output.stride[0] * sizeof(T)) % 16 != 0) return false;
  for (int i = 0; i < a.num_slices; ++i) {
    if (a.slices[i].out_dim % vec != 0 || a.slices[i].col_offset % vec != 0) return false;
  }
  return true;
}

template <typename T>
bool shrink_vectorizable(const LoraArgs& a, const TensorRef& input) {
  constexpr int vec = detail::kVec16<T>;
  return detail::aligned16(input.data) && (input.stride[0] * sizeof(T)) % 16 == 0 &&
         a.in_dim % vec == 0;
}

template <typename T, int VEC_IN, int VEC_OUT, int MT>
void launch_split(const LoraArgs& a, int64_t max_blocks, int64_t max_out_dim, cudaStream_t stream);

template <typename T>
void run_lora(LoraArgs& a, const TensorRef& input, const TensorRef& output, int64_t max_blocks,
              cudaStream_t stream) {
  constexpr int vec = detail::kVec16<T>;
  int64_t max_out_dim = 0;
  for (int i = 0; i < a.num_slices; ++i) max_out_dim = std::max(max_out_dim, a.slices[i].out_dim);
  const bool vec_in = shrink_vectorizable<T>(a, input);
  const bool vec_out = expand_vectorizable<T>(a, output);
  // Decode: few pairs per (slot, expert) group, so a 2-row tile wastes no FMAs.
  const int64_t groups = std::max<int64_t>(1, std::min(a.num_pairs, max_blocks));
  const bool few_rows = a.num_pairs <= 2 * groups;
  if (few_rows) {
    if (vec_in && vec_out) launch_split<T, vec, vec, 2>(a, max_blocks, max_out_dim, stream);
    else if (vec_in) launch_split<T, vec, 1, 2>(a, max_blocks, max_out_dim, stream);
    else if (vec_out) launch_split<T, 1, vec, 2>(a, max_blocks, max_out_dim, stream);
    else launch_split<T, 1, 1, 2>(a, max_blocks, max_out_dim, stream);
  } else {
    if (vec_in && vec_out) launch_split<T, vec, vec, 8>(a, max_blocks, max_out_dim, stream);
    else if (vec_in) launch_split<T, vec, 1, 8>(a, max_blocks, max_out_dim, stream);
    else if (vec_out) launch_split<T, 1, vec, 8>(a, max_blocks, max_out_dim, stream);
    else launch_split<T, 1, 1, 8>(a, max_blocks, max_out_dim, stream);
  }
}

template <typename T, int VEC_IN, int VEC_OUT, int MT>
void launch_split(const LoraArgs& a, int64_t max_blocks, int64_t max_out_dim, cudaStream_t stream) {
  const dim3 shrink_grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(max_blocks),
                         static_cast<unsigned>(a.num_slices));
  const size_t shrink_smem = sizeof(float) * MT * a.chunk + sizeof(int32_t) * a.block_m;
  if (shrink_smem > 48 * 1024) {
    MOELORA_CUDA_CHECK(cudaFuncSetAttribute(lora_shrink_kernel<T, VEC_IN, MT>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shrink_smem)));
  }
  lora_shrink_kernel<T, VEC_IN, MT><<<shrink_grid, kShrinkThreads, shrink_smem, stream>>>(a);
  detail::check_launch("fused_moe_lora shrink");

  const int64_t tile = 32 * VEC_OUT;
  const dim3 expand_grid(static_cast<unsigned>((max_out_dim + tile - 1) / tile),
                         static_cast<unsigned>(max_blocks), static_cast<unsigned>(a.num_slices));
  const size_t expand_smem = sizeof(float) * MT * a.rank_stride + sizeof(int32_t) * a.block_m;
  if (expand_smem > 48 * 1024) {
    MOELORA_CUDA_CHECK(cudaFuncSetAttribute(lora_expand_kernel<T, VEC_OUT, MT>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(expand_smem)));
  }
  lora_expand_kernel<T, VEC_OUT, MT><<<expand_grid, 32, expand_smem, stream>>>(a);
  detail::check_launch("fused_moe_lora expand");
}

void lora_delta(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                const TensorRef& block_slot, const TensorRef& block_expert,
                const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream_ptr) {
  if (slices.size() > static_cast<size_t>(kMaxSlices)) {
    throw InvalidArgument("fused_moe_lora: the CUDA kernel takes at most " +
                          std::to_string(kMaxSlices) + " slices, got " +
                          std::to_string(slices.size()));
  }
  const auto absent = [](const TensorRef& t) { return t.data == nullptr && t.ndim == 0; };
  cudaStream_t stream = detail::as_stream(stream_ptr);
  const int64_t max_blocks = block_slot.shape[0];
  if (max_blocks == 0 || input.shape[0] == 0 || output.shape[0] == 0) return;

  LoraArgs a{};
  a.input = input.data;
  a.input_stride = input.stride[0];
  a.input_rows = input.shape[0];
  a.in_dim = input.shape[1];
  a.input_pairs_per_row = input_pairs_per_row;
  a.output = output.data;
  a.output_stride = output.stride[0];
  a.num_pairs = output.shape[0];
  a.weights = absent(topk_weights) ? nullptr : static_cast<const float*>(topk_weights.data);
  a.weight_stride = absent(topk_weights) ? 0 : topk_weights.stride[0];
  a.sorted_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  a.pairs_stride = sorted_pairs.stride[0];
  a.block_slot = static_cast<const int32_t*>(block_slot.data);
  a.block_slot_stride = block_slot.stride[0];
  a.block_expert = absent(block_expert) ? nullptr : static_cast<const int32_t*>(block_expert.data);
  a.block_expert_stride = absent(block_expert) ? 0 : block_expert.stride[0];
  a.num_blocks = static_cast<const int32_t*>(num_blocks.data);
  a.block_m = block_m;
  a.num_slices = static_cast<int32_t>(slices.size());
  int32_t rank_stride = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    const LoraSiteView& v = slices[i];
    SliceArgs& s = a.slices[i];
    s.arena = v.arena;
    s.row_offsets = v.row_offsets;
    s.slot_stride = v.slot_stride;
    s.ranks = v.ranks;
    s.rank_slot_stride = v.rank_slot_stride;
    s.num_slots = v.num_slots;
    s.num_experts = v.num_experts;
    s.max_rank = v.max_rank;
    s.out_dim = v.out_dim;
    s.col_offset = col_offsets[i];
    if (v.num_slots > 0) rank_stride = std::max(rank_stride, v.max_rank);
  }
  if (rank_stride == 0 || a.in_dim == 0) return;  // no slot can add anything
  a.rank_stride = rank_stride;
  a.rows_total = max_blocks * block_m;

  // Split-K: about two waves of CTAs for the shrink, chunks of whole 256-element warp steps
  // when the blocks alone do not fill the SMs, never more than kMaxChunk elements per CTA.
  const int64_t base_ctas = max_blocks * a.num_slices;
  const int64_t wanted = (2 * int64_t{detail::sm_count()} + base_ctas - 1) / base_ctas;
  const int64_t useful = (a.in_dim + kMinChunk - 1) / kMinChunk;
  const int64_t fewest = (a.in_dim + kMaxChunk - 1) / kMaxChunk;
  int64_t splits = std::max(fewest, std::min(wanted, useful));
  int64_t chunk = (a.in_dim + splits - 1) / splits;
  chunk = chunk > kMinChunk / 2 ? (chunk + kMinChunk - 1) / kMinChunk * kMinChunk
                                : (chunk + 7) / 8 * 8;
  chunk = std::min(chunk, kMaxChunk);
  splits = (a.in_dim + chunk - 1) / chunk;
  a.chunk = chunk;
  a.splits = static_cast<int32_t>(splits);

  const size_t workspace_bytes =
      sizeof(float) * a.num_slices * splits * a.rows_total * a.rank_stride;
  MOELORA_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&a.partials), workspace_bytes, stream));
  try {
    MOELORA_DISPATCH_FLOAT(input.dtype, T, run_lora<T>(a, input, output, max_blocks, stream));
  } catch (...) {
    cudaFreeAsync(a.partials, stream);
    throw;
  }
  MOELORA_CUDA_CHECK(cudaFreeAsync(a.partials, stream));
}

}  // namespace

void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, void* stream) {
  lora_delta(input, input_pairs_per_row, output, topk_weights, sorted_pairs, block_slot,
             block_expert, num_blocks, block_m, slices, col_offsets, stream);
}

void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream) {
  const TensorRef no_weights{};
  const TensorRef expert_zero{};
  lora_delta(input, /*input_pairs_per_row=*/1, output, no_weights, sorted_rows, block_slot,
             expert_zero, num_blocks, block_m, slices, col_offsets, stream);
}

}  // namespace moelora::cuda
