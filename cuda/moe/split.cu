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

}  // namespace

void launch_split_finish(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                         cudaStream_t stream) {
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
