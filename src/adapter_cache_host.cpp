// The host tier: reader threads turning adapter files into host copies, and which copies stay.
//
// A load is a job of chunks (adapter_cache_plan.cpp). Every reader thread takes the next chunk
// of the oldest job that has chunks left, preads it into its own buffer and converts it into the
// job's host copy while the bytes are still in its cache; so one cold adapter is read by every
// thread at once, and at most host_threads jobs are open. A failed chunk fails the job: the
// remaining chunks are skipped, the thread that finishes the last one closes the files, fails
// the adapter and lets the buffer go back to the HostBlockPool.
// A load wanted on the device streams to it from the read (adapter_cache_stream.cpp).
//
// Which copies stay: at most max_cpu_loras (and max_cpu_bytes). A read starts when there is
// room or when a copy less urgent than it can go. Urgency: a queued request's position first,
// then wanted on the device (a request not yet in the demand list, or waiting for a slot), then
// idle (resident on the device, or read by prefetch_host alone). Among equals the least popular
// (note_request, decayed) and then least recently used goes, but a read never evicts an equal:
// reads for adapters that all wait for the device would otherwise replace each other's copies
// in turn.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "adapter_cache_state.h"
#include "copy_engine_internal.h"

namespace moelora {

namespace {

// Long enough for a thread blocked on the CUDA driver's lock to wake and take it (tens of us),
// short beside a block's page-locking (~2 ms for 8 MB).
constexpr std::chrono::microseconds kPauseBetweenPinnedBlocks{250};
// How often idle readers look again whether a graph capture that kept them from making the host
// reserve has ended.
constexpr std::chrono::milliseconds kReserveRecheck{20};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

using detail::AdapterEntry;
using detail::DeviceState;
using detail::HostState;
using detail::kNoDemand;

const std::vector<double>& load_seconds_buckets() {
  static const std::vector<double> bounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                             0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};
  return bounds;
}

void LoadHistogram::observe(double seconds) {
  const auto& bounds = load_seconds_buckets();
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin());
  ++counts[bucket];
}

namespace detail {

struct ReadHookAccess {
  static AdapterCache::State& state(AdapterCache& cache) { return *cache.state_; }
};

void set_read_hook(AdapterCache& cache, ReadHook hook) {
  AdapterCache::State& s = ReadHookAccess::state(cache);
  std::lock_guard<std::mutex> lock(s.mutex);
  s.read_hook = std::move(hook);
}

bool is_settled(AdapterCache& cache) {
  AdapterCache::State& s = ReadHookAccess::state(cache);
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.busy_readers > 0 || !s.jobs.empty() || s.preparing_jobs > 0 || s.starter_busy ||
      !s.start_queue.empty() || s.retry_wanted || s.device_loads_in_flight_locked()) {
    return false;
  }
  return s.startable_host_load_locked() == nullptr;
}

}  // namespace detail

void AdapterCache::State::queue_host_load_locked(const EntryPtr& e) {
  if (e->host_state != HostState::kNone) return;
  e->host_state = HostState::kQueued;
  e->host_queue_order = ++host_queue_clock;
  host_queue.push_back(e);
  host_work.notify_all();
}

void AdapterCache::State::set_host_ready_locked(AdapterEntry& e,
                                                std::shared_ptr<HostBuffer> copy) {
  e.host = std::move(copy);
  e.host_state = HostState::kReady;
  e.host_lru = ++lru_clock;
  ++host_copies;
}

void AdapterCache::State::drop_host_copy_locked(AdapterEntry& e) {
  if (e.host_state != HostState::kReady) return;
  e.host.reset();  // back to the HostBlockPool once no copy reads it
  e.host_state = HostState::kNone;
  --host_copies;
}

int64_t AdapterCache::State::host_urgency_locked(const AdapterEntry& e) const {
  if (e.device_state == DeviceState::kResident) return kNoDemand;
  if (e.demand != kNoDemand) return e.demand;
  // Wanted on the device by a request not (yet) in the queue's demand list: kept over idle
  // copies, so that such requests' reads do not evict each other's copies in turn.
  return e.want_device ? kNoDemand - 1 : kNoDemand;
}

// Popularity, for both tiers: which of two equally urgent copies leaves first.
void AdapterCache::note_request(int64_t id) {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    EntryPtr e = s.get_locked(id);
    ++s.requests_seen;
    e->popularity = s.popularity_locked(*e) + 1.0;
    e->popularity_at = s.requests_seen;
  }
  touch(id);
}

double AdapterCache::State::popularity_locked(const AdapterEntry& e) const {
  if (config.popularity_half_life <= 0 || e.popularity == 0.0) return e.popularity;
  const double since = static_cast<double>(requests_seen - e.popularity_at);
  return e.popularity * std::exp2(-since / static_cast<double>(config.popularity_half_life));
}

bool AdapterCache::State::leaves_first_locked(const AdapterEntry& a, uint64_t a_lru,
                                              const AdapterEntry& b, uint64_t b_lru) const {
  if (config.popularity_half_life > 0) {
    // A count decayed below one request no longer counts: among those, recency decides.
    auto counted = [](double p) { return p >= 1.0 ? p : 0.0; };
    const double pa = counted(popularity_locked(a)), pb = counted(popularity_locked(b));
    if (pa != pb) return pa < pb;
  }
  return a_lru < b_lru;
}

AdapterEntry* AdapterCache::State::host_victim_locked(const AdapterEntry* protect) const {
  AdapterEntry* victim = nullptr;
  for (const auto& [id, e] : entries) {
    if (e->host_state != HostState::kReady || e.get() == protect) continue;
    if (e->device_state == DeviceState::kAllocating || e->device_state == DeviceState::kCopying) {
      continue;  // its copy is being read
    }
    // The least urgent goes first; among equals, the least popular, then least recently used.
    if (!victim || host_urgency_locked(*e) > host_urgency_locked(*victim) ||
        (host_urgency_locked(*e) == host_urgency_locked(*victim) &&
         leaves_first_locked(*e, e->host_lru, *victim, victim->host_lru))) {
      victim = e.get();
    }
  }
  return victim;
}

void AdapterCache::State::enforce_host_limits_locked(const AdapterEntry* protect) {
  while (true) {
    bool over = host_copies > config.max_cpu_loras;
    if (!over && config.max_cpu_bytes > 0) {
      int64_t bytes = 0;
      for (const auto& [id, e] : entries) {
        if (e->host_state == HostState::kReady) bytes += e->host_copy_bytes();
      }
      over = bytes > config.max_cpu_bytes;
    }
    AdapterEntry* victim = over ? host_victim_locked(protect) : nullptr;
    if (!victim) return;
    drop_host_copy_locked(*victim);
    ++counters.host_evictions;
    // Still waiting for the device: its read is queued again (it starts when its turn and the
    // host tier's room allow).
    if (victim->device_state == DeviceState::kWaiting) {
      queue_host_load_locked(entries.at(victim->id));
    }
  }
}

EntryPtr AdapterCache::State::startable_host_load_locked() {
  const int64_t open_jobs = static_cast<int64_t>(jobs.size()) + preparing_jobs;
  if (open_jobs >= config.host_threads) return nullptr;
  host_queue.erase(std::remove_if(host_queue.begin(), host_queue.end(),
                                  [](const EntryPtr& e) {
                                    return e->cancelled || e->host_state != HostState::kQueued;
                                  }),
                   host_queue.end());
  // The most urgent first (queue position, then wanted on the device), in arrival order.
  auto best = std::min_element(host_queue.begin(), host_queue.end(),
                               [this](const EntryPtr& a, const EntryPtr& b) {
                                 const int64_t ua = host_urgency_locked(*a);
                                 const int64_t ub = host_urgency_locked(*b);
                                 return ua != ub ? ua < ub
                                                 : a->host_queue_order < b->host_queue_order;
                               });
  if (best == host_queue.end()) return nullptr;
  // Room in the host tier, or a copy less urgent than this one to make room with (an idle
  // copy always is).
  if (host_copies + open_jobs < std::max<int64_t>(1, config.max_cpu_loras)) return *best;
  const AdapterEntry* victim = host_victim_locked(nullptr);
  if (victim && (host_urgency_locked(*victim) == kNoDemand ||
                 host_urgency_locked(*victim) > host_urgency_locked(**best))) {
    return *best;
  }
  return nullptr;
}

std::shared_ptr<ReadJob> AdapterCache::State::claimable_job_locked() const {
  for (const auto& job : jobs) {
    if (job->next_chunk < job->plan.chunks.size()) return job;
  }
  return nullptr;
}

std::shared_ptr<ReadJob> AdapterCache::State::prepare_job(const EntryPtr& e) {
  auto job = std::make_shared<ReadJob>();
  job->entry = e;
  job->start = std::chrono::steady_clock::now();
  job->files = std::make_unique<detail::OpenFiles>(*e);
  job->plan = detail::build_read_plan(*e, config.dtype, config.read_chunk_bytes);
  const auto taking = std::chrono::steady_clock::now();
  job->buffer = buffers->take(e->host_copy_bytes(),
                               e->host_block_bytes(config.host_block_bytes));
  job->buffer_seconds = seconds_since(taking);
  for (const detail::ByteRange& pad : job->plan.row_padding) {
    std::memset(job->buffer->at(pad.offset), 0, static_cast<size_t>(pad.bytes));
  }
  job->chunk_blocks = detail::chunk_host_blocks(*e, job->plan, config.dtype,
                                                job->buffer->block_bytes());
  job->block_writers.assign(job->buffer->num_blocks(), 0);
  job->block_queued.assign(job->buffer->num_blocks(), false);
  for (const auto& blocks : job->chunk_blocks) {
    for (int32_t b : blocks) ++job->block_writers[b];
  }
  return job;
}

void AdapterCache::State::read_chunk(ReadJob& job, size_t index, detail::ReaderScratch& scratch,
                                     const detail::ReadHook& hook) {
  const AdapterEntry& e = *job.entry;
  const detail::ReadChunk& chunk = job.plan.chunks[index];
  if (hook) hook(e.name, chunk.file, static_cast<int64_t>(index));
  if (scratch.staging.size() < static_cast<size_t>(chunk.bytes)) {
    scratch.staging.resize(static_cast<size_t>(chunk.bytes));
  }
  job.files->read(e, chunk, scratch.staging.data());
  for (const detail::ChunkPiece& piece : chunk.pieces) {
    detail::convert_piece(e, job.plan, piece, scratch.staging.data(), config.dtype,
                          *job.buffer, scratch);
  }
  detail::stream_fence();  // the host copy's bytes are visible before the chunk counts as done
}

void AdapterCache::State::finish_job_locked(const std::shared_ptr<ReadJob>& job,
                                            std::unique_lock<std::mutex>& lock) {
  job->finishing = true;
  jobs.erase(std::find(jobs.begin(), jobs.end(), job));
  const EntryPtr e = job->entry;
  if (!job->failed && !e->cancelled) {
    lock.unlock();
    try {
      job->files->check_unchanged(*e);
    } catch (const std::exception& ex) {
      job->failed = true;
      job->error = ex.what();
    }
    lock.lock();
  }
  job->files.reset();
  host_work.notify_all();  // a job slot is free
  if (job->streaming) end_stream_locked(*job, lock);  // while its copies may read the buffer
  if (e->cancelled || job->failed) job->buffer.reset();  // back to the pool, before anyone looks
  if (e->cancelled) return;
  if (job->failed) {
    e->host_state = HostState::kFailed;
    // A load that was allocating to stream from this read sees the failure and lets go itself.
    if (e->device_state != DeviceState::kAllocating) e->device_state = DeviceState::kNone;
    ++counters.host_loads_failed;
    fail_locked(*e, job->error);
    return;
  }
  set_host_ready_locked(*e, std::move(job->buffer));
  // A load that waited for this copy is retried below: until then it is not waiting for memory
  // (a waiter woken meanwhile must not take it for one).
  if (e->device_state == DeviceState::kWaiting) e->device_state = DeviceState::kNone;
  const double seconds = seconds_since(job->start);
  ++counters.host_loads;
  counters.host_bytes_read += job->plan.read_bytes;
  counters.host_load_seconds += seconds;
  counters.host_buffer_seconds += job->buffer_seconds;
  host_histogram.observe(seconds);
  enforce_host_limits_locked(e->want_device ? e.get() : nullptr);
  changed.notify_all();
  if (e->want_device) {
    lock.unlock();
    try_start_device_load(e);
    retry_waiting();  // one ahead of it may have been waiting for this turn
    lock.lock();
  }
}

void AdapterCache::State::reader_loop() {
  if (device_table) detail::relax_capture_mode_of_this_thread();
  detail::ReaderScratch scratch;
  std::unique_lock<std::mutex> lock(mutex);
  ++busy_readers;
  while (true) {
    std::shared_ptr<ReadJob> job;
    EntryPtr start;
    --busy_readers;
    bool reserve = false;
    auto has_work = [&] {
      if (stopping) return true;
      job = claimable_job_locked();
      if (!job) start = startable_host_load_locked();
      // Not during a graph capture, which refuses page-locking: checked again every
      // kReserveRecheck while a reserve block is wanted (no one signals a capture's end).
      reserve = !job && !start && buffers->wants_reserve_block() && !graph_capture_in_progress();
      return job || start || reserve;
    };
    while (!has_work()) {
      if (buffers->wants_reserve_block()) {
        host_work.wait_for(lock, kReserveRecheck);
      } else {
        host_work.wait(lock);
      }
    }
    ++busy_readers;
    if (stopping) return;
    if (reserve) {  // nothing to read: one more block of the host reserve, made ahead
      lock.unlock();
      try {
        buffers->make_reserve_block(kPauseBetweenPinnedBlocks);
      } catch (const std::exception&) {
        // Out of host memory: the reserve stops where it got; loads allocate as they go.
      }
      lock.lock();
      continue;
    }
    if (job) {
      const size_t index = job->next_chunk++;
      const bool skip = job->failed || job->entry->cancelled;
      const detail::ReadHook hook = read_hook;
      lock.unlock();
      // Nothing may escape this thread: a failure fails the job (and so the adapter).
      std::string error;
      if (!skip) {
        try {
          read_chunk(*job, index, scratch, hook);
        } catch (const std::exception& ex) {
          error = ex.what();
        } catch (...) {
          error = "unknown error while reading its weights";
        }
      }
      lock.lock();
      if (!error.empty() && !job->failed) {
        job->failed = true;
        job->error = error;
      }
      if (!skip && error.empty()) on_chunk_converted_locked(*job, index, lock);
      ++job->finished;  // after its blocks are queued: the job's end queues the row table
      if (job->done()) finish_job_locked(job, lock);
      continue;
    }
    host_queue.erase(std::find(host_queue.begin(), host_queue.end(), start));
    ++preparing_jobs;
    lock.unlock();
    std::shared_ptr<ReadJob> prepared;
    std::string error;
    try {
      prepared = prepare_job(start);
    } catch (const std::exception& ex) {
      error = ex.what();
    } catch (...) {
      error = "unknown error while opening its files";
    }
    lock.lock();
    --preparing_jobs;
    host_work.notify_all();
    if (start->cancelled) continue;
    if (!error.empty()) {
      start->host_state = HostState::kFailed;
      start->device_state = DeviceState::kNone;
      ++counters.host_loads_failed;
      fail_locked(*start, error);
      continue;
    }
    if (prepared->plan.chunks.empty()) {  // nothing to read (never for a validated spec)
      prepared->finished = 0;
      jobs.push_back(prepared);
      finish_job_locked(prepared, lock);
      continue;
    }
    // Page-locked beside the read whenever blocks were asked for: a copy smaller than one block
    // is one block, left ordinary by take() all the same. (Without blocks, take() page-locked
    // the buffer already, or could not: relocking a whole copy here would hold the driver.)
    prepared->pinning = !prepared->buffer->pinned() &&
                        start->host_block_bytes(config.host_block_bytes) > 0;
    jobs.push_back(prepared);
    ask_stream_start_locked(prepared);  // wanted on the device: the load need not wait
    if (prepared->pinning) {
      // The other readers read the chunks while this one page-locks the blocks they fill: the
      // page-locking (~5 GB/s) costs a cold load no more than its read, and each block holds
      // the CUDA driver's lock for about 2 ms. The pause lets a CUDA call waiting for that lock
      // (a decode step's launch) take it: without it this loop takes it straight back.
      lock.unlock();
      const auto start = std::chrono::steady_clock::now();
      bool locked_one = false;  // no pause where nothing was page-locked (no CUDA)
      for (size_t b = 0; b < prepared->buffer->num_blocks(); ++b) {
        if (prepared->buffer->block_pinned(b)) continue;  // a kept block: locked already
        if (locked_one) std::this_thread::sleep_for(kPauseBetweenPinnedBlocks);
        locked_one = prepared->buffer->pin_block(b);
      }
      const double seconds = seconds_since(start);
      lock.lock();
      prepared->buffer_seconds += seconds;
      prepared->pinning = false;
      if (prepared->done()) {
        finish_job_locked(prepared, lock);
      } else {
        ask_stream_start_locked(prepared);
      }
    }
  }
}

void AdapterCache::load_host(int64_t id) {
  check_not_capturing("AdapterCache::load_host");
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  if (e->host_state == HostState::kReady) {
    e->host_lru = ++s.lru_clock;
    return;
  }
  s.queue_host_load_locked(e);
  s.changed.wait(lock, [&] { return e->cancelled || e->host_state != HostState::kQueued; });
  if (e->cancelled) throw Cancelled("adapter '" + e->name + "' was unregistered while loading");
  if (e->failed) {
    const std::string prefix = "adapter '" + e->name + "': ";
    const bool prefixed = e->error.compare(0, prefix.size(), prefix) == 0;
    throw AdapterError(e->name, prefixed ? e->error.substr(prefix.size()) : e->error);
  }
}

void AdapterCache::prefetch_host(int64_t id) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  if (e->failed) return;
  if (e->host_state == HostState::kReady) {
    e->host_lru = ++s.lru_clock;
    return;
  }
  s.queue_host_load_locked(e);
}

}  // namespace moelora
