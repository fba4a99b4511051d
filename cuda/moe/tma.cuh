// PTX wrappers of the stream kernel (moe/stream.cuh): shared-memory barriers with transaction
// counts (mbarrier) and bulk asynchronous copies from global to shared memory (cp.async.bulk,
// the non-tensor form of TMA), sm_90+. Barriers are addressed by their shared-memory address
// (ptx::smem_u32).
//
// Phases: a barrier completes a phase when its pending arrivals reach zero and every byte it
// expects (arrive_expect_tx) has landed; waits name the parity of the phase they wait for. On a
// fresh barrier (phase 0 under way) a wait for parity 1 returns at once: the producer of a ring
// starts that way on its empty slots.
#pragma once

#include <cstdint>

namespace moelora::cuda::moe::tma {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ void init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Makes initialised barriers visible to the other threads and to the asynchronous proxy (the
// copies complete on them); followed by __syncthreads() before any use.
__device__ __forceinline__ void fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` more to land in the current phase.
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// One arrival (release: the caller's earlier shared-memory reads and writes are done).
__device__ __forceinline__ void arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Whether the phase of `parity` has completed, without waiting.
__device__ __forceinline__ bool test_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// The GPU's global nanosecond timer.
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// A wait this long is a bug in the barrier protocol, not a slow copy: the kernel traps, so the
// caller gets a CUDA error instead of a hung stream.
constexpr uint64_t kHangNs = 20ull * 1000 * 1000 * 1000;

__device__ __forceinline__ bool try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits (acquire) until the phase of `parity` has completed; try_wait suspends the thread for a
// while in hardware before it reports failure, so this is not a busy loop.
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
  if (try_wait(bar, parity)) return;
  const uint64_t start = global_ns();
  while (!try_wait(bar, parity)) {
    if (global_ns() - start > kHangNs) __trap();
  }
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to
// shared memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

#else  // before sm_90: never launched (moe/dispatch.cu refuses the stream kernel there)

__device__ __forceinline__ void init(uint32_t, uint32_t) {}
__device__ __forceinline__ void fence_init() {}
__device__ __forceinline__ void arrive_expect_tx(uint32_t, uint32_t) {}
__device__ __forceinline__ void arrive(uint32_t) {}
__device__ __forceinline__ bool test_wait(uint32_t, uint32_t) { return true; }
__device__ __forceinline__ void wait(uint32_t, uint32_t) {}
__device__ __forceinline__ uint64_t global_ns() { return 0; }
constexpr uint64_t kHangNs = 0;
__device__ __forceinline__ void bulk_copy(uint32_t, const void*, uint32_t, uint32_t) {}

#endif

}  // namespace moelora::cuda::moe::tma
