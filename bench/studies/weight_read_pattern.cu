// How the expert GEMM's weight reads should be laid out at decode: the tiled kernel's pattern
// (moe/gemm.cuh: a warp reads 64 bytes of each of 16 weight rows per k-step, rows one weight
// row apart) against the same bytes stored k-step-major per 16-row tile (a warp's k-step one
// contiguous KB). Same grid, same 4 k-steps in flight per lane in registers, and a chain of
// dependent integer work per k-step standing in for the dequantization. Pure reads: answers
// whether the kernel's wait on its loads is the DRAM access pattern. Build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/wrp bench/studies/weight_read_pattern.cu && /tmp/wrp
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kExperts = 26;   // touched experts (gpt-oss-20b w13 at 16 tokens)
constexpr int kRows = 5760;    // w13 rows of an expert
constexpr int kRowBytes = 1440;  // 2880 MXFP4 elements
constexpr int kSteps = (kRowBytes + 63) / 64;  // 23 k-steps of 64 bytes
constexpr int kTileBytes = kSteps * 1024;      // 16 rows, k-step-major
constexpr int kD = 4;
// Dynamic shared memory that holds residency at the kernel's 5 CTAs per SM.
constexpr size_t kSmemForFiveCtas = 44 * 1024;

// kGroup: k-steps whose loads a lane issues together (1: each step's load as its slot frees, as
// the kernel does; 2 or 4: 128 or 256 contiguous bytes of a row requested at once, the ring
// refilled a group at a time).
template <bool kTiled, int kWork, int kGroup>
__global__ void __launch_bounds__(128) read_weights(const uint8_t* w, uint32_t* sink) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int64_t expert = blockIdx.y;
  const int row_tile = blockIdx.x * 4 + warp;  // 16 rows per warp
  const uint8_t* base[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t n = int64_t{row_tile} * 16 + g + 8 * h;
    base[h] = kTiled ? w + (expert * (kRows / 16) + row_tile) * int64_t{kTileBytes} +
                           (g + 8 * h) * 64 + 16 * c
                     : w + (expert * kRows + n) * int64_t{kRowBytes} + 16 * c;
  }
  const int stride = kTiled ? 1024 : 64;
  const int lane_steps = kTiled ? kSteps : (kRowBytes - 16 * c + 63) / 64;
  uint4 ring[kD][2];
  auto load = [&](uint4 (&r)[2], int step) {
    for (int h = 0; h < 2; ++h) {
      r[h] = step < lane_steps
                 ? __ldcs(reinterpret_cast<const uint4*>(base[h] + int64_t{step} * stride))
                 : make_uint4(0, 0, 0, 0);
    }
  };
#pragma unroll
  for (int d = 0; d < kD; ++d) load(ring[d], d);
  uint32_t acc = 0;
  for (int s0 = 0; s0 < kSteps; s0 += kD) {
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      const int step = s0 + d;
      if (step < kSteps) {
        uint32_t v = ring[d][0].x ^ ring[d][0].y ^ ring[d][0].z ^ ring[d][0].w ^ ring[d][1].x ^
                     ring[d][1].y ^ ring[d][1].z ^ ring[d][1].w;
#pragma unroll
        for (int i = 0; i < kWork; ++i) v = __funnelshift_l(v, v, 5) + (acc ^ i);
        acc += v;
        if ((d + 1) % kGroup == 0) {
#pragma unroll
          for (int q = d + 1 - kGroup; q <= d; ++q) load(ring[q], s0 + q + kD);
        }
      }
    }
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;
}

template <bool kTiled, int kWork, int kGroup = 1>
float time_us(const uint8_t* w, uint32_t* sink, cudaEvent_t a, cudaEvent_t b) {
  const dim3 grid(kRows / 64, kExperts);
  std::vector<float> times;
  for (int i = 0; i < 25; ++i) {
    read_weights<kTiled, kWork, kGroup><<<grid, 128, kSmemForFiveCtas>>>(w, sink);
    cudaEventRecord(a);
    read_weights<kTiled, kWork, kGroup><<<grid, 128, kSmemForFiveCtas>>>(w, sink);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    times.push_back(ms * 1e3f);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <int kWork>
void report(const uint8_t* row_major, const uint8_t* tiled, uint32_t* sink, cudaEvent_t a,
            cudaEvent_t b) {
  const double bytes = double{kExperts} * kRows * kRowBytes;
  const float t_rows = time_us<false, kWork>(row_major, sink, a, b);
  const float t_rows2 = time_us<false, kWork, 2>(row_major, sink, a, b);
  const float t_rows4 = time_us<false, kWork, 4>(row_major, sink, a, b);
  const float t_tiled = time_us<true, kWork>(tiled, sink, a, b);
  std::printf("{\"work_per_step\": %d, \"row_major_us\": %.1f, \"row_major_tbps\": %.2f, "
              "\"row_major_by_2_us\": %.1f, \"row_major_by_4_us\": %.1f, "
              "\"tiled_us\": %.1f, \"tiled_tbps\": %.2f}\n",
              kWork, t_rows, bytes / t_rows * 1e-6, t_rows2, t_rows4, t_tiled,
              bytes / t_tiled * 1e-6);
}

}  // namespace

int main() {
  // 4 copies of each layout so that consecutive launches never find their weights in L2.
  const size_t rows_bytes = size_t{kExperts} * kRows * kRowBytes;
  const size_t tiled_bytes = size_t{kExperts} * (kRows / 16) * kTileBytes;
  uint8_t *row_major = nullptr, *tiled = nullptr;
  uint32_t* sink = nullptr;
  cudaMalloc(&row_major, rows_bytes);
  cudaMalloc(&tiled, tiled_bytes);
  cudaMalloc(&sink, 4096);
  cudaMemset(row_major, 1, rows_bytes);
  cudaMemset(tiled, 1, tiled_bytes);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("{\"device\": \"%s\", \"bytes\": %zu}\n", prop.name, rows_bytes);
  report<0>(row_major, tiled, sink, a, b);
  report<40>(row_major, tiled, sink, a, b);
  report<100>(row_major, tiled, sink, a, b);
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) std::printf("error: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
