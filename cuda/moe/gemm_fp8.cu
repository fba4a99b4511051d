// Tensor-core expert GEMM (moe/gemm.cuh) over block-scaled FP8 (e4m3) expert weights, bfloat16
// activations.
#include "common/kernel_modules.cuh"
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

void launch_gemm_fp8(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream) {
  launch_gemm<Fp8Format>(a, block_m, max_blocks, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
