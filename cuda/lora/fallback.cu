// The split-K LoRA kernels: the general fallback of fused_moe_lora and dense_lora for
// float32, rows that are not 16-byte aligned and anything the cluster and mma kernels decline.
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
// Blocks past num_blocks (read on the device), slots of rank 0, padding rows (-1) and
// out-of-range ids do no work. Template space: dtype x {16-byte, scalar} x MT {2, 8}.
#include <algorithm>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "lora/kernels.h"

namespace moelora::cuda {

namespace {

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int64_t kMaxChunk = 1024;  // in_dim elements per shrink CTA (fp32 staging: MT * 4 KB)
constexpr int64_t kMinChunk = 256;   // one warp step of 16-byte loads of a 16-bit row
static_assert(kMaxChunk % kMinChunk == 0, "chunks are whole warp steps");

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
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
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
  float* partial_base =
      a.partials +
      ((int64_t{slice_index} * a.splits + blockIdx.x) * a.rows_total + b * a.block_m) *
          a.rank_stride;

  for (int m0 = 0; m0 < n; m0 += MT) {
    // Stage MT input rows of the chunk as fp32 (zeros past the block's last pair).
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const bool row_valid = m0 + m < n;
      const T* x =
          row_valid ? input + (pair_ids[m0 + m] / a.input_pairs_per_row) * a.input_stride + k0
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
  wait_for_previous_grid();  // the shrink's partials, and memory at all, only from here
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

template <typename T, int VEC_IN, int VEC_OUT, int MT>
void launch_split(const LoraArgs& a, int64_t max_blocks, int64_t max_out_dim, bool pdl,
                  cudaStream_t stream) {
  const dim3 shrink_grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(max_blocks),
                         static_cast<unsigned>(a.num_slices));
  const size_t shrink_smem = sizeof(float) * MT * a.chunk + sizeof(int32_t) * a.block_m;
  if (shrink_smem > 48 * 1024) {
    detail::allow_dynamic_smem(lora_shrink_kernel<T, VEC_IN, MT>, shrink_smem);
  }
  launch_kernel(lora_shrink_kernel<T, VEC_IN, MT>,
                LaunchShape{shrink_grid, dim3(kShrinkThreads), shrink_smem, stream, 1, pdl}, a);
  detail::check_launch("fused_moe_lora shrink");

  const int64_t tile = 32 * VEC_OUT;
  const dim3 expand_grid(static_cast<unsigned>((max_out_dim + tile - 1) / tile),
                         static_cast<unsigned>(max_blocks), static_cast<unsigned>(a.num_slices));
  const size_t expand_smem = sizeof(float) * MT * a.rank_stride + sizeof(int32_t) * a.block_m;
  if (expand_smem > 48 * 1024) {
    detail::allow_dynamic_smem(lora_expand_kernel<T, VEC_OUT, MT>, expand_smem);
  }
  launch_kernel(lora_expand_kernel<T, VEC_OUT, MT>,
                LaunchShape{expand_grid, dim3(32), expand_smem, stream, 1, pdl}, a);
  detail::check_launch("fused_moe_lora expand");
}


template <typename T>
void run_splitk(const LoraArgs& a, LoraVectorization vec, int64_t max_blocks, bool pdl,
                cudaStream_t stream) {
  constexpr int v = detail::kVec16<T>;
  int64_t max_out_dim = 0;
  for (int i = 0; i < a.num_slices; ++i) max_out_dim = std::max(max_out_dim, a.slices[i].out_dim);
  // Decode: few pairs per (slot, expert) group, so a 2-row tile wastes no FMAs.
  const int64_t groups = std::max<int64_t>(1, std::min(a.num_pairs, max_blocks));
  const bool few_rows = a.num_pairs <= 2 * groups;
  if (few_rows) {
    if (vec.input && vec.output) launch_split<T, v, v, 2>(a, max_blocks, max_out_dim, pdl, stream);
    else if (vec.input) launch_split<T, v, 1, 2>(a, max_blocks, max_out_dim, pdl, stream);
    else if (vec.output) launch_split<T, 1, v, 2>(a, max_blocks, max_out_dim, pdl, stream);
    else launch_split<T, 1, 1, 2>(a, max_blocks, max_out_dim, pdl, stream);
  } else {
    if (vec.input && vec.output) launch_split<T, v, v, 8>(a, max_blocks, max_out_dim, pdl, stream);
    else if (vec.input) launch_split<T, v, 1, 8>(a, max_blocks, max_out_dim, pdl, stream);
    else if (vec.output) launch_split<T, 1, v, 8>(a, max_blocks, max_out_dim, pdl, stream);
    else launch_split<T, 1, 1, 8>(a, max_blocks, max_out_dim, pdl, stream);
  }
}

}  // namespace

void launch_lora_splitk(LoraArgs& a, DType dtype, LoraVectorization vec, int64_t max_blocks,
                        const LoraPlan& plan, cudaStream_t stream) {
  a.rows_total = max_blocks * a.block_m;
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
  a.partials = static_cast<float*>(detail::scratch_alloc(workspace_bytes, stream));
  try {
    MOELORA_DISPATCH_FLOAT(dtype, T, run_splitk<T>(a, vec, max_blocks, plan.pdl, stream));
  } catch (...) {
    cudaFreeAsync(a.partials, stream);  // best effort: the launch error is the one to report
    throw;
  }
  detail::scratch_free(a.partials, stream);
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
