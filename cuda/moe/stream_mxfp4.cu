// Persistent stream expert GEMM (moe/stream.cuh) over MXFP4 expert weights (GPT-OSS), bfloat16
// activations.
#include "moe/stream.cuh"

namespace moelora::cuda::moe {

std::string launch_stream_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream) {
  return launch_stream<Mxfp4Format>(a, block_m, max_blocks, consumers, stream);
}

}  // namespace moelora::cuda::moe
