// The AdapterCache's state, shared by adapter_cache_host.cpp (host tier: reader threads, read
// jobs, host LRU) and adapter_cache.cpp (device tier, public API).
// Lock order: pool allocation (which runs eviction listeners) is never called with `mutex` held;
// HostBlockPool's mutex is a leaf.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "adapter_cache_internal.h"
#include "host_block_pool.h"
#include "moelora/adapter_cache.h"
#include "moelora/error.h"

namespace moelora {

using EntryPtr = std::shared_ptr<detail::AdapterEntry>;

// The copies of pages [first, end) of an adapter's host copy `source` into its device `pages`,
// consecutive pages merged into one region.
std::vector<CopyRegion> page_copy_regions(PagePool& pool, const std::vector<PageId>& pages,
                                          int64_t first, int64_t end, const HostBuffer& source,
                                          int64_t page_bytes);

// Lets the pool's eviction listener (which may outlive the cache) reach it safely.
struct ListenerLink {
  std::mutex mutex;
  AdapterCache::State* state = nullptr;
};

// One adapter's disk -> host load: its chunks are claimed by the reader threads in order.
struct ReadJob {
  EntryPtr entry;
  detail::ReadPlan plan;
  std::unique_ptr<detail::OpenFiles> files;
  std::shared_ptr<HostBuffer> buffer;
  size_t next_chunk = 0;  // the next chunk to claim
  size_t finished = 0;    // chunks read and converted, or skipped after a failure
  bool failed = false;    // once set, the remaining chunks are skipped
  bool pinning = false;   // the preparing reader still page-locks the buffer's blocks
  double buffer_seconds = 0;  // obtaining the buffer and page-locking it
  std::string error;
  std::chrono::steady_clock::time_point start;
  bool finishing = false;  // finish_job_locked has begun

  // Streaming to the device (adapter_cache_stream.cpp): once a device load is attached, each
  // block of the host copy is queued for the device as soon as every chunk that writes it is
  // converted, while the later chunks are still read.
  std::vector<std::vector<int32_t>> chunk_blocks;  // the host blocks each chunk writes
  std::vector<int32_t> block_writers;              // chunks still to convert, per block
  std::vector<bool> block_queued;                  // per block: its copy is queued
  bool streaming = false;           // a device load is attached: slot, pages, row table
  std::vector<CopyTicket> tickets;  // the block copies queued so far
  int submitting = 0;               // threads queuing block copies without the mutex

  // Every chunk is done, the blocks are page-locked and no block copy is being queued.
  bool done() const {
    return finished == plan.chunks.size() && !pinning && submitting == 0 && !finishing;
  }
};

struct LoadHistogram {
  std::vector<int64_t> counts = std::vector<int64_t>(load_seconds_buckets().size() + 1, 0);
  void observe(double seconds);
};

struct AdapterCache::State {
  State(PagePool& p, CopyEngine& c, AdapterCacheConfig cfg)
      : pool(p), copies(c), config(std::move(cfg)), table(config.sites, config.max_lora_rank) {}

  PagePool& pool;
  CopyEngine& copies;
  AdapterCacheConfig config;
  RowTableLayout table;
  std::vector<int64_t> host_row_offsets;  // [max_loras][entries_per_slot]
  std::vector<int32_t> host_ranks;        // [max_loras][rank_entries_per_slot]
  bool device_table = false;
  int device_index = 0;
  int64_t* device_row_offsets = nullptr;
  int32_t* device_ranks = nullptr;
  std::vector<int32_t> zero_ranks;  // source of slot clears on the device table
  std::vector<int64_t> slot_owner;
  std::vector<CopyTicket> slot_clear_ticket;

  mutable std::mutex mutex;
  std::condition_variable changed;
  std::condition_variable host_work;
  std::condition_variable copy_work;
  std::map<int64_t, EntryPtr> entries;
  std::map<std::string, int64_t> names;
  int64_t next_id = 1;
  uint64_t lru_clock = 0;
  uint64_t device_releases = 0;  // slots and device pages given back: wait() asks again after one
  uint64_t requests_seen = 0;  // note_request calls: the clock popularity decays by
  uint64_t host_queue_clock = 0;
  std::vector<EntryPtr> host_queue;  // host loads not yet started; started by demand, then FIFO
  std::vector<std::shared_ptr<ReadJob>> jobs;  // host loads in flight, oldest first
  int preparing_jobs = 0;                      // jobs being opened and allocated
  int busy_readers = 0;                        // reader threads not waiting for work
  bool finalizer_busy = false;                 // the finalizer holds a copy it took
  int64_t host_copies = 0;                     // entries whose host copy is ready
  std::vector<EntryPtr> demanded;              // entries with a demand position
  struct InFlight {
    EntryPtr entry;
    CopyTicket ticket;
    std::shared_ptr<HostBuffer> source;  // keeps the host pages alive during the copy
  };
  std::deque<InFlight> copy_queue;
  bool stopping = false;
  AdapterCacheStats counters;
  LoadHistogram host_histogram, device_histogram;
  detail::ReadHook read_hook;
  std::shared_ptr<detail::HostBlockPool> buffers;
  std::shared_ptr<ListenerLink> link = std::make_shared<ListenerLink>();
  // Device loads asked for by prefetch / set_demand, started in order by the starter thread
  // (adapter_cache_device.cpp), then a retry of those waiting for memory.
  std::deque<EntryPtr> start_queue;
  bool retry_wanted = false;
  bool starter_busy = false;  // the starter holds loads it took
  std::condition_variable start_work;
  std::vector<std::thread> readers;  // reader_threads() of them
  std::thread finalizer;
  std::thread starter;

  int pack_threads() const {
    if (config.pack_threads > 0) return config.pack_threads;
    const int hardware = static_cast<int>(std::thread::hardware_concurrency());
    return std::clamp(hardware / std::max(1, config.host_threads), 1, 8);
  }
  int reader_threads() const { return config.host_threads * pack_threads(); }

  EntryPtr get_locked(int64_t id) const {
    auto it = entries.find(id);
    if (it == entries.end()) throw NotFound("no adapter with id " + std::to_string(id));
    return it->second;
  }
  Residency residency_locked(const detail::AdapterEntry& e) const;

  // ---- host tier (adapter_cache_host.cpp) ----
  void queue_host_load_locked(const EntryPtr& e);
  void set_host_ready_locked(detail::AdapterEntry& e, std::shared_ptr<HostBuffer> copy);
  void drop_host_copy_locked(detail::AdapterEntry& e);
  // Urgency of e's host copy (lower is more urgent): its demand position; else just below
  // kNoDemand while it is wanted on the device; kNoDemand when it is resident on the device or
  // idle.
  int64_t host_urgency_locked(const detail::AdapterEntry& e) const;
  // e's popularity now (decayed to requests_seen).
  double popularity_locked(const detail::AdapterEntry& e) const;
  // Whether a should leave a tier before b, both equally urgent: the less popular first, then
  // the less recently used (lru: the tier's recency stamps of a and b).
  bool leaves_first_locked(const detail::AdapterEntry& a, uint64_t a_lru,
                           const detail::AdapterEntry& b, uint64_t b_lru) const;
  detail::AdapterEntry* host_victim_locked(const detail::AdapterEntry* protect) const;
  void enforce_host_limits_locked(const detail::AdapterEntry* protect);
  EntryPtr startable_host_load_locked();
  // A device load started and not yet finished: its copy queued or being finished, its entry
  // allocating or copying, or a slot held by an unregistered adapter's load (the thread that
  // owns that load frees it once it sees the load cancelled).
  bool device_loads_in_flight_locked() const;
  std::shared_ptr<ReadJob> claimable_job_locked() const;
  std::shared_ptr<ReadJob> prepare_job(const EntryPtr& e);
  void read_chunk(ReadJob& job, size_t chunk, detail::ReaderScratch& scratch,
                  const detail::ReadHook& hook);
  void finish_job_locked(const std::shared_ptr<ReadJob>& job, std::unique_lock<std::mutex>& lock);
  void reader_loop();

  // ---- device tier (adapter_cache.cpp) ----
  void clear_slot_locked(int32_t slot);
  void drop_device_locked(detail::AdapterEntry& e, bool free_pages);
  // Whether a load of `for_entry` may evict resident `victim` (see set_demand).
  static bool may_evict(const detail::AdapterEntry& victim, const detail::AdapterEntry& for_entry);
  int32_t find_slot_locked(const detail::AdapterEntry& for_entry);
  void fail_locked(detail::AdapterEntry& e, const std::string& what);
  // Gives back the pages (and pin) and the slot of a device load that will not finish
  // (kAllocating): the entry goes back to kNone. Its queued copies must have landed.
  void release_device_load_locked(detail::AdapterEntry& e);
  void settle_copies() noexcept;
  // Never throws: whatever goes wrong fails this adapter (and so its requests) alone.
  void try_start_device_load(const EntryPtr& e) noexcept;
  void start_device_load(const EntryPtr& e);
  // Queues e's device load (null: a retry of waiting loads only) for the starter thread.
  void ask_device_start_locked(const EntryPtr& e);
  void starter_loop();
  // Fills `slot`'s row table for `pages` and queues the copy of `source` and the table (called
  // without the mutex); returns its ticket.
  CopyTicket queue_device_copy(const AdapterRowLayout& layout, const std::vector<PageId>& pages,
                               const HostBuffer& source, int32_t slot);
  // Fills the host side of `slot`'s row table for an adapter in `pages` (without the mutex).
  void fill_row_table(const AdapterRowLayout& layout, const std::vector<PageId>& pages,
                      int32_t slot);
  // The copies of `slot`'s row table to the device (none without a device table).
  std::vector<CopyRegion> row_table_regions(int32_t slot);
  void on_device_load_error(const EntryPtr& e, const std::string& what) noexcept;
  void retry_waiting();

  // ---- streaming a read to the device (adapter_cache_stream.cpp) ----
  // e's read in progress that a device load may attach to: its buffer page-locked (or copies
  // made by the CPU), nothing failed, no load attached yet. Null when there is none.
  std::shared_ptr<ReadJob> streamable_job_locked(const detail::AdapterEntry& e) const;
  // Asks for e's device load once its read can stream (a read just prepared or page-locked).
  void ask_stream_start_locked(const std::shared_ptr<ReadJob>& job);
  // Attaches e's device load (slot and pages held, kAllocating) to its read: fills the row
  // table and queues the blocks already converted. Finishes the job if it was waiting for this.
  void attach_stream_locked(const std::shared_ptr<ReadJob>& job,
                            std::unique_lock<std::mutex>& lock);
  // After chunk `index` of `job` is converted: queues the copies of the blocks it completed.
  void on_chunk_converted_locked(ReadJob& job, size_t index, std::unique_lock<std::mutex>& lock);
  // Queues the copies of every block all of whose chunks are converted, the mutex dropped
  // meanwhile; a copy that cannot be queued fails the job.
  void queue_converted_blocks_locked(ReadJob& job, std::unique_lock<std::mutex>& lock);
  // At the end of a streaming job, before its host copy is kept: the row table is queued after
  // the blocks and the load goes to the finalizer, or, when the read failed or the adapter was
  // unregistered, the queued copies are waited for and the slot and pages go back.
  void end_stream_locked(ReadJob& job, std::unique_lock<std::mutex>& lock);
  void finalizer_loop();
  void on_pool_eviction(Owner owner);
};

}  // namespace moelora
