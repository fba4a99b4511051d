// How the LoRA path's kernels are launched: thread-block clusters, and programmatic dependent
// launch (PDL, sm_90+).
//
// Why PDL: the LoRA kernels run back to back (align -> w13 -> w2 in a layer, shrink -> expand
// in the split-K family), each short, so the launch latency between two of them (~1.3 us in a
// CUDA graph on the H200) is a large share of a decode step (docs/performance.md, "PDL"). A kernel
// launched with cudaLaunchAttributeProgrammaticStreamSerialization may start its CTAs before the
// kernel ahead of it in the stream has finished: as soon as every CTA of that kernel has called
// release_next_grid() or exited, without waiting for the grid's completion and memory flush.
// Its CTAs then set up from their parameters and wait in wait_for_previous_grid() until the
// previous kernel has completed and its writes are visible.
//
// The contract every kernel launched with `after_previous_grid` keeps: no global memory read
// or write before wait_for_previous_grid(). Only parameters (constant bank), shared memory and
// registers before it. Nothing else is assumed about who wrote what, so any caller's order of
// kernels is safe: a torch kernel ahead of ours simply never releases early, and a kernel
// launched normally behind ours ignores the early release.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda_check.h"

namespace moelora::cuda {

// Blocks until the previous kernel in the stream has completed and its memory is visible; a
// no-op when this kernel was launched normally or before sm_90.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel in the stream, if it is launched programmatically, start its CTAs now
// (it starts anyway as this grid's CTAs exit). Called late, in a CTA's last phase, or not at
// all: released at a kernel's start, the next grid's waiting CTAs take SM slots beside a
// one-wave grid for its whole run. Where each kernel calls it: docs/performance.md, "PDL".
__device__ __forceinline__ void release_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

struct LaunchShape {
  dim3 grid, block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;
  int cluster_x = 1;                 // CTAs per cluster along x (grid.x a multiple of it)
  // PDL (the plan's `pdl`, which holds only on sm_90+); the kernel calls
  // wait_for_previous_grid() before its first global access
  bool after_previous_grid = false;
};

// kernel<<<grid, block, smem, stream>>>(args...) with the shape's cluster and PDL attributes.
// cluster_x == 1 launches without the cluster attribute, which GPUs before sm_90 do not have.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), const LaunchShape& shape, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.smem;
  config.stream = shape.stream;
  cudaLaunchAttribute attributes[2]{};
  unsigned count = 0;
  if (shape.cluster_x > 1) {
    cudaLaunchAttribute& cluster = attributes[count++];
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(shape.cluster_x);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
  }
  if (shape.after_previous_grid) {
    cudaLaunchAttribute& pdl = attributes[count++];
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  MOELORA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace moelora::cuda
