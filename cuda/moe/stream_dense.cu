// Persistent stream expert GEMM (moe/stream.cuh) over dense bfloat16 / float16 expert weights.
#include "common/kernel_modules.cuh"
#include "moe/stream.cuh"

namespace moelora::cuda::moe {

std::string launch_stream_dense(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    return launch_stream<DenseFormat<__nv_bfloat16>>(a, block_m, max_blocks, consumers, stream);
  }
  return launch_stream<DenseFormat<__half>>(a, block_m, max_blocks, consumers, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
