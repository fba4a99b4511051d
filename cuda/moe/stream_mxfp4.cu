// Persistent stream expert GEMM (moe/stream.cuh) over MXFP4 expert weights (GPT-OSS), bfloat16
// activations. Both word layouts: the stream kernel decodes through the format's a_pairs like
// the tiled one, so the mma layout is one more instantiation (stream_mxfp4_mma.cu).
#include "common/kernel_modules.cuh"
#include "moe/stream.cuh"

namespace moelora::cuda::moe {

std::string launch_stream_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream) {
  if (a.mxfp4_layout == MoeMxfp4Layout::kMma) {
    return launch_stream_mxfp4_mma(a, block_m, max_blocks, consumers, stream);
  }
  if (a.mxfp4_layout == MoeMxfp4Layout::kMmaTiled) {
    return "its bulk copies read MXFP4 rows as stored (the checkpoint or mma layout, not tiles)";
  }
  return launch_stream<Mxfp4Format>(a, block_m, max_blocks, consumers, stream);
}

}  // namespace moelora::cuda::moe

MOELORA_KERNEL_MODULE()
