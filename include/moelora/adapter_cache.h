// The adapter tiers: disk (registered safetensors, header only) -> host (converted to the
// model dtype, scale folded into B, in page order in a page-locked HostBuffer; bounded, by
// recency and queue demand) -> device (pages of the unified PagePool, a row-table slot; loaded
// on the copy engine).
//
// Life of an adapter: register_adapter() validates everything and reads no weights. prefetch()
// starts an asynchronous load. Disk -> host: the cache's reader threads pread the needed bytes
// of the files in large chunks, in parallel, and convert each chunk as it arrives straight into
// the rows of the host copy (dtype, scale, NaN/Inf check, transposition in one pass). Host ->
// device: pages are allocated (evicting idle adapters), the host copy's pages are copied as a
// few long runs, and the slot's row-table entries are written before the load's ticket
// completes. A device load asked for while its adapter is still read (into page-locked memory)
// streams from the read: its pages are taken at once and each block of the host copy is copied
// as soon as it is converted, the row table last. If no slot or pages can be found the load
// waits (Residency::kWaitingForMemory) and is retried on the next prefetch() or set_demand().
// acquire() pins a resident adapter for a batch; release() unpins it.
//
// Queue demand (set_demand): loads start in the order of the queued requests that wait for
// them, and a resident adapter that a queued request waits for is evicted (from either tier)
// only for an adapter whose request is ahead of it in the queue; idle adapters go first, least
// recently used first.
//
// Thread-safe. Lock order: the cache never calls into the PagePool's allocation (which may run
// eviction listeners) while holding its own mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelora/copy_engine.h"
#include "moelora/dtype.h"
#include "moelora/page_pool.h"
#include "moelora/row_layout.h"

namespace moelora {

namespace detail {
struct ReadHookAccess;  // the reader test hook (src/adapter_cache_internal.h)
}

// Where one LoRA matrix comes from: a strided 2D view [rows, cols] (in elements) into a tensor
// of one of the adapter's files. For A it must be [rank, in_dim]; for B it is B^T,
// [rank, out_dim]. `scale` is multiplied into B. One source may stand for the same view of
// `experts` consecutive experts (expert, expert + 1, ...), each `expert_stride` elements on from
// the one before: a fused expert tensor is one source, not one per expert.
struct LoraMatrixSource {
  int32_t site = 0;
  int32_t layer = 0;
  int32_t expert = 0;
  bool is_b = false;
  int32_t file = 0;  // index into AdapterSpec::files
  std::string tensor;
  int64_t offset = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  float scale = 1.0f;
  int32_t experts = 1;
  int64_t expert_stride = 0;
};

struct AdapterSpec {
  std::string name;
  std::vector<std::string> files;  // safetensors paths
  SiteRanks ranks;                 // [site][layer], 0 = not targeted
  std::vector<LoraMatrixSource> matrices;
};

struct AdapterCacheConfig {
  std::vector<LoraSite> sites;
  int32_t max_loras = 1;        // device slots
  int32_t max_lora_rank = 16;
  int64_t max_cpu_loras = 8;    // host copies kept
  int64_t max_cpu_bytes = 0;    // 0 = unbounded
  DType dtype = DType::kFloat32;  // the model dtype; weights are converted to it
  // Disk -> host loads: at most host_threads adapters are read at once, by a pool of
  // host_threads * pack_threads reader threads that all work on the oldest load first (so one
  // cold adapter gets every thread). pack_threads 0: the machine's hardware threads /
  // host_threads, 1 to 8.
  int32_t host_threads = 4;
  int32_t pack_threads = 0;
  // Bytes of one pread (chunks start at multiples of it, moved to a row boundary): large enough
  // for the storage's full rate, small enough that a chunk stays in the reader's cache while it
  // is converted.
  int64_t read_chunk_bytes = int64_t{1} << 20;
  // Host copies in blocks of about this many bytes (whole pages; HostBuffer), 0: one block per
  // copy, page-locked when allocated. Page-locking holds the CUDA driver's lock and a decode
  // step's launches wait for it: on an H100 host one 420 MB copy held a step 0.12-0.25 s and
  // came before the read (bench cold-ttft: TTFT 2.23x its bound; 8 MB blocks: 1.21x, steps
  // while loading up to 22 ms; with the reserve below: 1.08x, no step above 4.2 ms). A copy
  // takes kept blocks (page-locked already) where it can; new blocks start as ordinary memory,
  // and the reader that prepared the load page-locks them one at a time, with a pause between
  // them for waiting CUDA calls, while the other readers fill them.
  int64_t host_block_bytes = int64_t{8} << 20;
  // Host memory made ahead for host copies, in blocks of host_block_bytes: faulted in and
  // page-locked by idle reader threads, so that the first cold loads neither fault nor lock
  // pages on their path (the blocks of copies that leave the host tier are reused the same
  // way). 0: none made ahead. It is host memory beyond max_cpu_bytes: blocks kept plus blocks
  // in use stay within the larger of the most ever in use and (in use + this reserve).
  int64_t host_reserve_bytes = 0;
  // Popularity: every note_request() counts one request for its adapter, and every count halves
  // after this many requests to the cache, so that yesterday's favourite does not stay forever.
  // Among copies equally urgent (no queued demand, or the same), the less popular leaves a tier
  // first (a count decayed below one request counts as none), then the least recently used.
  // 0: recency alone.
  int64_t popularity_half_life = 256;
};

enum class Residency : uint8_t {
  kDisk = 0,              // registered; no host copy
  kHost = 1,              // host copy ready; not on the device
  kLoading = 2,           // on its way to the device
  kDevice = 3,            // resident in a slot; usable by kernels
  kFailed = 4,            // loading failed; error_message() says why
  kWaitingForMemory = 5,  // wants the device but no slot or pages were free; retried later
};
const char* residency_name(Residency residency);

struct AdapterCacheStats {
  int64_t registered = 0;
  int64_t on_disk = 0;
  int64_t on_host = 0;  // residency kHost
  int64_t loading = 0;
  int64_t on_device = 0;
  int64_t failed = 0;
  int64_t waiting_for_memory = 0;
  int64_t host_copies = 0;  // adapters holding a host copy, whatever their device state
  int64_t host_bytes = 0;
  int64_t host_loads = 0;        // disk -> host loads completed
  int64_t device_loads = 0;      // host -> device loads completed
  // Device loads started while their adapter was still read from disk, copied block by block
  // as the read converted them (their load_seconds count from the end of the read).
  int64_t device_loads_streamed = 0;
  int64_t device_evictions = 0;  // by slot pressure or by the pool for KV
  int64_t host_evictions = 0;
  int64_t bytes_loaded = 0;  // host -> device bytes
  double load_seconds = 0;   // wall time from the start of each device load to its completion
  int64_t host_bytes_read = 0;     // file bytes read by disk -> host loads
  double host_load_seconds = 0;    // wall time of disk -> host loads (read start to host copy)
  // Of those loads, the time spent obtaining host buffers and page-locking them (a new one-block
  // buffer is page-locked before its read; blocks are page-locked beside it).
  double host_buffer_seconds = 0;
  int64_t host_loads_failed = 0;   // loads whose read or check failed
  int64_t host_buffers_in_use = 0;  // host buffers held by host copies, reads and copies
  int64_t host_blocks_kept = 0;         // host blocks kept for reuse (page-locked where possible)
  int64_t host_block_bytes_kept = 0;
  int64_t host_block_bytes_in_use = 0;  // behind host copies, reads and copies
  int64_t host_reserve_blocks_made = 0;  // blocks made ahead (host_reserve_bytes), ever
  // Load latency histograms: counts of loads per bucket of load_seconds_buckets() (the last
  // count is above the last bound), disk -> host and host -> device.
  std::vector<int64_t> host_load_histogram;
  std::vector<int64_t> device_load_histogram;
};

// Upper bounds (seconds) of the load latency histogram buckets, ascending.
const std::vector<double>& load_seconds_buckets();

class AdapterCache {
 public:
  AdapterCache(PagePool& pool, CopyEngine& copies, AdapterCacheConfig config);
  ~AdapterCache();
  AdapterCache(const AdapterCache&) = delete;
  AdapterCache& operator=(const AdapterCache&) = delete;

  // Validates the spec against the sites and the files' headers; throws AdapterError naming the
  // adapter and the problem. Returns the adapter's id (ids are never reused).
  int64_t register_adapter(const AdapterSpec& spec);
  // Cancels a pending load and frees the adapter's pages, slot and host copy. Throws
  // InvalidArgument while the adapter is acquired, NotFound for unknown names or ids.
  void unregister(int64_t id);
  void unregister(const std::string& name);
  int64_t id_of(const std::string& name) const;  // throws NotFound
  std::vector<int64_t> adapter_ids() const;

  // Reads the adapter into the host tier (blocking; the background thread does the work).
  // Throws AdapterError when the weights cannot be read or are not finite.
  void load_host(int64_t id);
  // Starts loading to the device if not resident (asynchronous), and retries every load
  // waiting for memory. Returns the adapter's residency after the attempt. in_background: the
  // start (a slot, pages with their evictions, the row table, queueing the copy's page runs)
  // and the retry run on the cache's starter thread, so a caller between decode steps does not
  // wait for them; the residency returned is then the one before the start (kLoading where the
  // start is pending).
  Residency prefetch(int64_t id, bool in_background = false);
  // Starts reading the adapter into the host tier (asynchronous; the device is not asked for).
  void prefetch_host(int64_t id);
  // The adapters queued requests wait for, most urgent first (an adapter's position is its
  // first index here; unknown ids are skipped). Each is prefetched; loads start in this order;
  // adapters not listed lose their demand. Replaces the previous call's list. in_background:
  // the loads start (and those waiting for memory are retried) on the starter thread, as for
  // prefetch.
  void set_demand(const std::vector<int64_t>& queued_adapters, bool in_background = false);
  // Blocks until the adapter is resident (returns its slot), failed (throws AdapterError) or
  // waiting for memory (throws PoolExhausted).
  int32_t wait(int64_t id);
  // Makes `cuda_stream` wait for the adapter's load (immediately usable if resident).
  void make_stream_wait(int64_t id, void* cuda_stream);
  // Pins a resident adapter and returns its slot; throws InvalidArgument if not resident.
  int32_t acquire(int64_t id);
  void release(int64_t id);
  void touch(int64_t id);  // recency alone
  // A request for the adapter arrived: counts toward its popularity (see AdapterCacheConfig)
  // and its recency, as touch() does.
  void note_request(int64_t id);

  Residency residency(int64_t id) const;
  std::string error_message(int64_t id) const;  // "" unless failed
  int32_t slot_of(int64_t id) const;            // -1 unless resident
  int64_t num_pages(int64_t id) const;          // pages the adapter takes on the device

  // The row-table slice of one site at one layer for every slot (device table when the pool's
  // arena is on a GPU, the host table otherwise).
  LoraSiteView site_view(int site_index, int layer) const;
  const RowTableLayout& row_table_layout() const;
  int32_t max_loras() const;
  AdapterCacheStats stats() const;

  struct State;  // internal; public so that the implementation files can share it

 private:
  friend struct detail::ReadHookAccess;
  std::unique_ptr<State> state_;
};

}  // namespace moelora
