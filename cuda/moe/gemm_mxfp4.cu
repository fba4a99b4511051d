// Tensor-core expert GEMM (moe/gemm.cuh) over MXFP4 expert weights (GPT-OSS), bfloat16
// activations.
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

void launch_gemm_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream) {
  launch_gemm<Mxfp4Format>(a, block_m, max_blocks, stream);
}

}  // namespace moelora::cuda::moe
