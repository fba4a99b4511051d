// The thread-block cluster as the LoRA kernels use it: size, rank, barrier and a peer CTA's
// shared memory (DSMEM). Clusters exist from sm_90 on; an older architecture runs clusters of
// one CTA (the host launches it so), where the calls reduce to the CTA's own.
#pragma once

#include <cooperative_groups.h>

namespace moelora::cuda {

struct Cluster {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __device__ int size() const {
    return static_cast<int>(cooperative_groups::this_cluster().num_blocks());
  }
  __device__ int rank() const {
    return static_cast<int>(cooperative_groups::this_cluster().block_rank());
  }
  __device__ void sync() const { cooperative_groups::this_cluster().sync(); }
  __device__ float* peer(float* local, int r) const {
    return cooperative_groups::this_cluster().map_shared_rank(local, r);
  }
#else
  __device__ int size() const { return 1; }
  __device__ int rank() const { return 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float* peer(float* local, int) const { return local; }
#endif
};

}  // namespace moelora::cuda
