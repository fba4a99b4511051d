// Tensor-core expert GEMM (moe/gemm.cuh) over MXFP4 expert weights in the tiled layout
// (MoeMxfp4Layout::kMmaTiled, the engine's), bfloat16 activations; launch_gemm_mxfp4
// dispatches here.
#include "common/kernel_modules.cuh"
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

void launch_gemm_mxfp4_tiled(const GemmArgs& a, int block_m, int64_t max_blocks,
                             cudaStream_t stream) {
  launch_gemm<Mxfp4TiledFormat>(a, block_m, max_blocks, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
