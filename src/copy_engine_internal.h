// Internal: the CUDA memory helpers shared by the copy engine, host buffers and the adapter
// cache's device row table. In builds without CUDA they report "no CUDA" (nullptr / CudaError).
// Also the CUDA copy engine's tuning knobs, counters and run planning, for tests and benchmarks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelora/copy_engine.h"

namespace moelora::detail {

// Page-locked host memory, or nullptr when CUDA or a GPU is absent or the allocation failed
// (the caller then falls back to ordinary memory).
void* try_pinned_host_alloc(int64_t bytes);
void pinned_host_free(void* ptr) noexcept;
// Page-locks ordinary host memory in place (false when CUDA or a GPU is absent or it failed),
// and undoes it.
bool try_host_register(void* ptr, int64_t bytes);
void host_unregister(void* ptr) noexcept;

// Sets the calling thread's CUDA stream-capture interaction mode to relaxed: a capture another
// thread begins in the global mode no longer makes this thread's waits and copies fail. For
// threads that only wait on the copy engine's own events (never on a captured stream or event).
void relax_capture_mode_of_this_thread() noexcept;

// Device memory on GPU `device_index`; throws CudaError without CUDA.
void* device_alloc(int64_t bytes, int device_index);
void device_free(void* ptr, int device_index) noexcept;

// ---- the CUDA copy engine's plan for one submission (pure C++, testable without a GPU) ----

// Drops empty regions and merges a region into the previous one when both its dst and its src
// continue the previous one's: the maximal runs, in submission order.
std::vector<CopyRegion> coalesce_copy_runs(const std::vector<CopyRegion>& regions);
// True when no run's destination overlaps another run's destination or any run's source, so
// the runs may be copied in any order or concurrently (one batch, several streams). Otherwise
// the engine copies them one by one in submission order on one stream.
bool copy_runs_independent(const std::vector<CopyRegion>& runs);
// Cuts runs into at most `parts` consecutive non-empty groups of about equal bytes; returns the
// group boundaries: {0, b1, ..., runs.size()} ({0} when there are no runs).
std::vector<size_t> split_copy_runs(const std::vector<CopyRegion>& runs, int parts);

// ---- the CUDA copy engine's knobs (defaults = make_cuda_copy_engine) ----

struct CudaCopyTuning {
  // Issue each stream's share of a submission as cudaMemcpyBatchAsync (CUDA >= 13 builds),
  // falling back to one cudaMemcpyAsync per run when the driver refuses batches. false: always
  // one cudaMemcpyAsync per run.
  bool batched = true;
  // A submission of at least split_min_bytes is spread over this many of the engine's streams
  // (0 = all of them, 1 = never), joined by events before the ticket's event is recorded.
  int split_streams = 0;
  int64_t split_min_bytes = int64_t{4} << 20;
  // cudaMemcpyFlagPreferOverlapWithCompute is set on a batch whose largest run has at most this
  // many bytes (it helps small copies and hurts large ones); 0 = never.
  int64_t overlap_hint_max_bytes = int64_t{128} << 10;
  // Test hook: every batch call acts as if the driver answered cudaErrorNotSupported (only this
  // engine remembers it; a real "not supported" is remembered for the whole process).
  bool simulate_batch_unsupported = false;
};

struct CudaCopyStats {
  int64_t submits = 0;
  int64_t batch_calls = 0;      // successful cudaMemcpyBatchAsync calls
  int64_t batched_runs = 0;     // runs copied by them
  int64_t per_run_calls = 0;    // cudaMemcpyAsync calls
  int64_t batch_fallbacks = 0;  // failed batch calls whose runs were redone one by one
  int64_t ordered_submits = 0;  // submissions with dependent runs (copied one by one, in order)
  int64_t split_submits = 0;    // submissions spread over several streams
  bool batches_enabled = false; // whether the next submission would try a batch
  std::string batch_error;      // why batches were given up, if they were
};

// make_cuda_copy_engine with explicit knobs.
std::unique_ptr<CopyEngine> make_cuda_copy_engine_tuned(int device_index, int num_streams,
                                                        const CudaCopyTuning& tuning);
// The counters of an engine made by make_cuda_copy_engine(_tuned); InvalidArgument otherwise.
CudaCopyStats cuda_copy_stats(const CopyEngine& engine);
// Whether this build can call cudaMemcpyBatchAsync at all (CUDA runtime >= 13.0 headers).
bool cuda_batch_copy_compiled();

}  // namespace moelora::detail
