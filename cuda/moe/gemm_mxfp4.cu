// Tensor-core expert GEMM (moe/gemm.cuh) over MXFP4 expert weights (GPT-OSS), bfloat16
// activations, in the words' layout: checkpoint nibbles here, the mma layout (src/mxfp4_layout.h)
// in gemm_mxfp4_mma.cu and its tiles (the engine's) in gemm_mxfp4_tiled.cu, their own files so
// that they build in parallel.
#include "common/kernel_modules.cuh"
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

void launch_gemm_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream) {
  if (a.mxfp4_layout == MoeMxfp4Layout::kMma) {
    return launch_gemm_mxfp4_mma(a, block_m, max_blocks, stream);
  }
  if (a.mxfp4_layout == MoeMxfp4Layout::kMmaTiled) {
    return launch_gemm_mxfp4_tiled(a, block_m, max_blocks, stream);
  }
  launch_gemm<Mxfp4Format>(a, block_m, max_blocks, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
