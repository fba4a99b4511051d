// Tensor-core expert GEMM (moe/gemm.cuh) over dense bfloat16 / float16 expert weights.
#include "common/kernel_modules.cuh"
#include "moe/gemm.cuh"

namespace moelora::cuda::moe {

void launch_gemm_dense(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                       cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    launch_gemm<DenseFormat<__nv_bfloat16>>(a, block_m, max_blocks, stream);
  } else {
    launch_gemm<DenseFormat<__half>>(a, block_m, max_blocks, stream);
  }
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
