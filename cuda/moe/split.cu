// The finishing kernel of the tiled expert GEMM's split-K (moe/gemm.cuh): adds the splits'
// fp32 partial sums and applies the epilogue the unsplit kernel applies in its own CTA.
//
// Math (per block b, expert e = block_expert[b], pair p of its rows, output column c):
//   acc[n]    = sum_{z = 0, 1, .., splits - 1} partials[z][p][n]     (fp32, always this order)
//   out[p, c] = round(w[p] * act(acc[c] + bias[e][c], acc[I + c] + bias[e][I + c]))   gated
//             = round(w[p] * (acc[c] + bias[e][c]))                                   plain
// with w[p] = 1 without routing weights: the order of operations of the kernel's epilogue.
// Grid: x = tiles of kFinishColumns output columns (one thread each), y = max_blocks; blocks
// past num_blocks exit at once. A thread walks the block's pair rows: the partials of one row
// are contiguous along n, so each split's loads are coalesced. Memory-bound on a few KB to a
// few MB that the GEMM has just written (L2-resident at decode); launched after the GEMM by
// PDL, so its launch overlaps the GEMM's last CTAs.
//
// With MoeEpilogue::sum_top_k = K (plain epilogue only) it also does moe_sum's work, so that a
// split w2 writes out[T, H] in one launch where the GEMM's rows and the sum took two:
//   y_k       = round(w[p] * (acc_p[c] + bias[topk_ids[p]][c]))      p = t*K + k, as above
//   out[t, c] = round(sum_{k = 0, 1, .., K - 1} (float(y_k) + float(addend[p][c])))
// with y_k rounded to the output dtype before the sum and the float additions in moe_sum's order
// (moe/simple.cu's moe_sum_kernel: sum += y + addend, addend 0 when absent), so the bits are
// those of the two ops. Grid: x = tiles of kSumColumns columns, y = tokens (strided past the
// grid's 65535); a thread's K * splits loads are independent, in flight together.
#include <algorithm>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

namespace {

constexpr int kFinishColumns = 128;  // output columns (threads) per CTA

template <typename T>
__global__ void __launch_bounds__(kFinishColumns)
    moe_split_finish_kernel(GemmArgs a, int32_t block_m) {
  wait_for_previous_grid();  // the GEMM's partials
  const int block = static_cast<int>(blockIdx.y);
  if (block >= *a.num_blocks) return;
  const int64_t expert = a.block_expert[block];
  const int64_t out_width = a.gated ? a.inter : a.n_dim;
  const int64_t col = int64_t{blockIdx.x} * kFinishColumns + threadIdx.x;
  if (col >= out_width) return;
  const float bias = load_bias(a, expert, col);
  const float up_bias = a.gated ? load_bias(a, expert, a.inter + col) : 0.0f;
  const int64_t split_stride = a.num_pairs * a.n_dim;
  for (int r = 0; r < block_m; ++r) {
    const int32_t p = a.sorted_pairs[int64_t{block} * block_m + r];
    if (p < 0) continue;  // padding
    const float* row = a.partials + int64_t{p} * a.n_dim;
    float value = 0.0f, up = 0.0f;
    for (int z = 0; z < a.splits; ++z) {
      value += __ldcg(row + z * split_stride + col);
      if (a.gated) up += __ldcg(row + z * split_stride + a.inter + col);
    }
    value += bias;
    if (a.gated) {
      up += up_bias;
      value = a.activation == MoeActivation::kSilu
                  ? moe_math::silu_glu(value, up)
                  : moe_math::gpt_oss_glu(value, up, a.alpha, a.limit);
    }
    if (a.topk_weights != nullptr) value *= a.topk_weights[int64_t{p} * a.topk_stride];
    static_cast<T*>(a.output)[int64_t{p} * a.output_stride + col] = detail::from_f32<T>(value);
  }
  release_next_grid();
}

constexpr int kSumColumns = 64;  // narrower CTAs: decode has one or two tokens of rows
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kSumColumns) moe_split_finish_sum_kernel(GemmArgs a) {
  wait_for_previous_grid();  // the GEMM's partials
  const int64_t col = int64_t{blockIdx.x} * kSumColumns + threadIdx.x;
  const int32_t top_k = a.sum_top_k;
  const int64_t tokens = a.num_pairs / top_k;
  const int64_t split_stride = a.num_pairs * a.n_dim;
  const auto* addend = static_cast<const T*>(a.sum_addend);
  if (col < a.n_dim) {
    for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
      float sum = 0.0f;
      for (int32_t k = 0; k < top_k; ++k) {
        const int64_t p = t * top_k + k;
        const int64_t expert = a.topk_ids[p];
        const float bias =
            expert >= 0 && expert < a.num_experts ? load_bias(a, expert, col) : 0.0f;
        const float* row = a.partials + p * a.n_dim + col;
        float value = 0.0f;
#pragma unroll 4
        for (int z = 0; z < a.splits; ++z) value += __ldcg(row + z * split_stride);
        value += bias;
        if (a.topk_weights != nullptr) value *= a.topk_weights[p * a.topk_stride];
        const float y = detail::to_f32(detail::from_f32<T>(value));  // the pair's row as stored
        const float add =
            addend == nullptr ? 0.0f : detail::to_f32(addend[p * a.sum_addend_stride + col]);
        sum += y + add;
      }
      static_cast<T*>(a.output)[t * a.output_stride + col] = detail::from_f32<T>(sum);
    }
  }
  release_next_grid();
}

}  // namespace

void launch_split_finish(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                         cudaStream_t stream) {
  if (a.sum_top_k > 0) {
    const int64_t tiles = (a.n_dim + kSumColumns - 1) / kSumColumns;
    const int64_t tokens = a.num_pairs / a.sum_top_k;
    if (tiles == 0 || tokens == 0) return;
    LaunchShape shape;
    shape.grid = dim3(static_cast<unsigned>(tiles),
                      static_cast<unsigned>(std::min(tokens, kMaxGridY)));
    shape.block = dim3(kSumColumns);
    shape.stream = stream;
    shape.after_previous_grid = true;
    if (dtype == DType::kBFloat16) {
      launch_kernel(moe_split_finish_sum_kernel<__nv_bfloat16>, shape, a);
    } else {
      launch_kernel(moe_split_finish_sum_kernel<__half>, shape, a);
    }
    return;
  }
  const int64_t width = a.gated ? a.inter : a.n_dim;
  const int64_t tiles = (width + kFinishColumns - 1) / kFinishColumns;
  if (tiles == 0 || max_blocks == 0) return;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(max_blocks));
  shape.block = dim3(kFinishColumns);
  shape.stream = stream;
  shape.after_previous_grid = true;
  if (dtype == DType::kBFloat16) {
    launch_kernel(moe_split_finish_kernel<__nv_bfloat16>, shape, a, int32_t{block_m});
  } else {
    launch_kernel(moe_split_finish_kernel<__half>, shape, a, int32_t{block_m});
  }
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
