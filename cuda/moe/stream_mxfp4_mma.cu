// Persistent stream expert GEMM (moe/stream.cuh) over MXFP4 expert weights in the mma layout
// (src/mxfp4_layout.h), bfloat16 activations; launch_stream_mxfp4 dispatches here.
#include "common/kernel_modules.cuh"
#include "moe/stream.cuh"

namespace moelora::cuda::moe {

std::string launch_stream_mxfp4_mma(const GemmArgs& a, int block_m, int64_t max_blocks,
                                    int consumers, cudaStream_t stream) {
  return launch_stream<Mxfp4MmaFormat>(a, block_m, max_blocks, consumers, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
