// Persistent stream expert GEMM (moe/stream.cuh) over block-scaled FP8 (e4m3) expert weights,
// bfloat16 activations.
#include "common/kernel_modules.cuh"
#include "moe/stream.cuh"

namespace moelora::cuda::moe {

std::string launch_stream_fp8(const GemmArgs& a, int block_m, int64_t max_blocks, int consumers,
                              cudaStream_t stream) {
  return launch_stream<Fp8Format>(a, block_m, max_blocks, consumers, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
