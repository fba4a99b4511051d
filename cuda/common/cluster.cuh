// The thread-block cluster as the LoRA kernels use it: size, rank, barrier and a peer CTA's
// shared memory (DSMEM). Clusters exist from sm_90 on; an older architecture runs clusters of
// one CTA (the host launches it so), where the calls reduce to the CTA's own.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <utility>

#include "cuda_check.h"
#include "common/launch.cuh"

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
  // sync() in two halves: arrive() (release: this thread's earlier accesses, DSMEM reads of
  // peers included, are done) and wait() (until every thread of the cluster has arrived), so
  // that work between them overlaps the barrier. Every thread calls both, alternately.
  __device__ void arrive() const { (void)cooperative_groups::this_cluster().barrier_arrive(); }
  __device__ void wait() const { cooperative_groups::this_cluster().barrier_wait(); }
  __device__ float* peer(float* local, int r) const {
    return cooperative_groups::this_cluster().map_shared_rank(local, r);
  }
#else
  __device__ int size() const { return 1; }
  __device__ int rank() const { return 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ void arrive() const {}
  __device__ void wait() const { __syncthreads(); }
  __device__ float* peer(float* local, int) const { return local; }
#endif
};

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of cluster_x CTAs along x (grid.x
// a multiple of it), launched normally (common/launch.cuh has the programmatic form).
template <typename... Params, typename... Args>
void launch_in_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, int cluster_x, Args&&... args) {
  launch_kernel(kernel, LaunchShape{grid, block, smem, stream, cluster_x, false},
                std::forward<Args>(args)...);
}

}  // namespace moelora::cuda
