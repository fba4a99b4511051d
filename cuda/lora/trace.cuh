// Phase timestamps of the decode kernel, compiled in only by the MOELORA_KERNEL_TRACE build
// option (CMake, OFF by default and in the wheel; bench/studies/decode_trace.py reads them).
// With it, thread 0 of the grid's first and last CTA stamps the global timer (ns) at each phase
// of its first item and prints the stamps at exit, so that a launch's time can be split into its
// round trips (the printf delays the next launch: only the in-kernel phases mean anything).
// Without it, PhaseTrace is empty and the kernel holds no trace code.
#pragma once

#include <cstdio>

#include "lora/args.cuh"

namespace moelora::cuda {

#ifdef MOELORA_KERNEL_TRACE
struct PhaseTrace {
  static constexpr int kMarks = 8;
  unsigned long long t[kMarks];
  int n = 0;
  __device__ void mark() {
    if (threadIdx.x != 0 || n >= kMarks) return;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t[n]));
    ++n;
  }
  __device__ void print(const LoraArgs& a) const {
    const bool first = blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
    const bool last = blockIdx.x == gridDim.x - 1 && blockIdx.y == gridDim.y - 1 &&
                      blockIdx.z == gridDim.z - 1;
    if (threadIdx.x != 0 || !(first || last) || n < kMarks) return;
    printf("cluster-trace slices=%d in_dim=%lld grid=%u,%u,%u cta=%s start=%llu phases=%llu,%llu,"
           "%llu,%llu,%llu,%llu,%llu\n",
           a.num_slices, static_cast<long long>(a.in_dim), gridDim.x, gridDim.y, gridDim.z,
           first ? "first" : "last", t[0], t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3],
           t[5] - t[4], t[6] - t[5], t[7] - t[6]);
  }
};
#else
struct PhaseTrace {
  __device__ void mark() {}
  __device__ void print(const LoraArgs&) const {}
};
#endif

}  // namespace moelora::cuda
