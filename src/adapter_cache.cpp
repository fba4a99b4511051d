// The adapter cache's device tier (slots, copy tickets, a finalizer thread that marks loads
// resident, pool evictions), queue demand, and the public API. Device loads start in
// adapter_cache_device.cpp, the host tier is in adapter_cache_host.cpp.
// Lock order: pool allocation (which runs eviction listeners) is never called with mutex held.
#include "moelora/adapter_cache.h"

#include <algorithm>
#include <thread>

#include "adapter_cache_state.h"
#include "copy_engine_internal.h"
#include "moelora/error.h"

namespace moelora {

using detail::AdapterEntry;
using detail::DeviceState;
using detail::HostState;
using detail::kNoDemand;

namespace {

// A failed adapter's error without the "adapter 'NAME': " that AdapterError puts back.
std::string problem_of(const AdapterEntry& e) {
  const std::string prefix = "adapter '" + e.name + "': ";
  return e.error.compare(0, prefix.size(), prefix) == 0 ? e.error.substr(prefix.size()) : e.error;
}

}  // namespace

const char* residency_name(Residency r) {
  switch (r) {
    case Residency::kDisk: return "disk";
    case Residency::kHost: return "host";
    case Residency::kLoading: return "loading";
    case Residency::kDevice: return "device";
    case Residency::kFailed: return "failed";
    case Residency::kWaitingForMemory: return "waiting_for_memory";
  }
  return "?";
}

Residency AdapterCache::State::residency_locked(const AdapterEntry& e) const {
  if (e.failed) return Residency::kFailed;
  switch (e.device_state) {
    case DeviceState::kResident: return Residency::kDevice;
    case DeviceState::kAllocating:
    case DeviceState::kCopying: return Residency::kLoading;
    case DeviceState::kWaiting:
      return e.host_state == HostState::kQueued ? Residency::kLoading
                                                : Residency::kWaitingForMemory;
    case DeviceState::kNone: break;
  }
  // Wanted on the device: being read, or its device load is about to start.
  if (e.want_device && e.host_state != HostState::kNone) return Residency::kLoading;
  return e.host_state == HostState::kReady ? Residency::kHost : Residency::kDisk;
}

// Zeroes the slot's table entries (kernels skip rank 0) and gives the slot back.
void AdapterCache::State::clear_slot_locked(int32_t slot) {
  const int64_t entries_per_slot = table.entries_per_slot();
  const int64_t ranks_per_slot = table.rank_entries_per_slot();
  std::fill_n(host_row_offsets.begin() + slot * entries_per_slot, entries_per_slot, 0);
  std::fill_n(host_ranks.begin() + slot * ranks_per_slot, ranks_per_slot, 0);
  slot_owner[slot] = -1;
  ++device_releases;
  if (device_table) {
    slot_clear_ticket[slot] = copies.submit({{device_ranks + slot * ranks_per_slot,
                                              zero_ranks.data(),
                                              ranks_per_slot * int64_t{sizeof(int32_t)}}});
  }
}

// Drops the device copy of a resident (or cancelled, copied) adapter.
void AdapterCache::State::drop_device_locked(AdapterEntry& e, bool free_pages) {
  if (free_pages) pool.free(adapter_owner(static_cast<uint64_t>(e.id)));
  ++device_releases;
  ++e.device_generation;
  if (e.slot >= 0) clear_slot_locked(e.slot);
  e.slot = -1;
  e.pages.clear();
  e.device_state = DeviceState::kNone;
  e.want_device = false;
  e.ticket = kNoCopyTicket;
  e.streamed_tickets.clear();
  host_work.notify_all();  // its host copy may now make room for another load
}

bool AdapterCache::State::may_evict(const AdapterEntry& victim, const AdapterEntry& for_entry) {
  return victim.demand == kNoDemand || victim.demand > for_entry.demand;
}

// Picks a free slot, else evicts an unpinned resident adapter that `for_entry` may evict: idle
// ones (no queued demand) first, the least popular and then least recently used of them, then
// those wanted furthest back.
int32_t AdapterCache::State::find_slot_locked(const AdapterEntry& for_entry) {
  // Device loads start in queue order: this one waits while one ahead of it has not started
  // yet (is still being read, or waits for memory). Slots then go to the requests furthest
  // ahead, and which adapter gets which slot and pages depends only on the calls made, not on
  // which read finished first (parallel engines replay these calls on every rank).
  for (const EntryPtr& other : demanded) {
    if (other->demand >= for_entry.demand) continue;
    if (!other->failed && other->want_device &&
        (other->device_state == DeviceState::kWaiting ||
         other->device_state == DeviceState::kNone)) {
      return -1;
    }
  }
  for (size_t s = 0; s < slot_owner.size(); ++s) {
    if (slot_owner[s] < 0) return static_cast<int32_t>(s);
  }
  AdapterEntry* victim = nullptr;
  for (auto& [id, e] : entries) {
    if (e->device_state != DeviceState::kResident || e->acquire_pins > 0) continue;
    if (!may_evict(*e, for_entry)) continue;
    if (!victim || e->demand > victim->demand ||
        (e->demand == victim->demand &&
         leaves_first_locked(*e, e->device_lru, *victim, victim->device_lru))) {
      victim = e.get();
    }
  }
  if (!victim) return -1;
  int32_t slot = victim->slot;
  drop_device_locked(*victim, true);
  ++counters.device_evictions;
  return slot;
}

// Marks the adapter failed: its requests fail with `what` (its paths cut to file names).
void AdapterCache::State::fail_locked(AdapterEntry& e, const std::string& what) {
  e.failed = true;
  e.error = detail::failure_message(e.name, what, e.spec.files);
  e.want_device = false;
  if (e.device_state == DeviceState::kWaiting) e.device_state = DeviceState::kNone;
  changed.notify_all();
}

// After a copy whose completion could not be confirmed: drains every copy (so no transfer can
// still land in the pages about to be given back) where that is possible.
void AdapterCache::State::settle_copies() noexcept {
  try {
    copies.synchronize();
  } catch (...) {  // a broken device: its pages are lost to it either way
  }
}

void AdapterCache::State::finalizer_loop() {
  if (device_table) detail::relax_capture_mode_of_this_thread();
  std::unique_lock<std::mutex> lock(mutex);
  while (true) {
    finalizer_busy = false;
    copy_work.wait(lock, [&] { return stopping || !copy_queue.empty(); });
    if (copy_queue.empty()) return;  // stopping with no copy left in flight
    InFlight job = copy_queue.front();
    copy_queue.pop_front();
    // Block copies queued while it was read, before `job.ticket` (fixed while kCopying).
    const std::vector<CopyTicket> streamed = job.entry->streamed_tickets;
    finalizer_busy = true;
    lock.unlock();
    // Nothing may escape this thread: a copy that cannot be confirmed fails its adapter.
    std::string error;
    try {
      for (CopyTicket block_copy : streamed) copies.wait(block_copy);
      copies.wait(job.ticket);
    } catch (const std::exception& ex) {
      error = std::string("its copy to the device failed: ") + ex.what();
    } catch (...) {
      error = "its copy to the device failed";
    }
    if (!error.empty()) settle_copies();
    job.source.reset();
    lock.lock();
    AdapterEntry& e = *job.entry;
    const Owner owner = adapter_owner(static_cast<uint64_t>(e.id));
    try {
      if (e.cancelled) {
        drop_device_locked(e, true);  // the copy completed; now its pages can go
      } else if (!error.empty()) {
        drop_device_locked(e, true);
        fail_locked(e, error);
      } else {
        pool.unpin(owner);  // the loading pin; acquire() adds its own
        e.device_state = DeviceState::kResident;
        e.streamed_tickets.clear();
        e.device_lru = ++lru_clock;
        ++counters.device_loads;
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - e.load_start)
                .count();
        counters.load_seconds += seconds;
        device_histogram.observe(seconds);
        enforce_host_limits_locked(nullptr);
        host_work.notify_all();  // its host copy no longer holds back other reads
      }
    } catch (const std::exception& ex) {
      if (!e.cancelled) fail_locked(e, std::string("finishing its load failed: ") + ex.what());
    } catch (...) {
      if (!e.cancelled) fail_locked(e, "finishing its load failed");
    }
    changed.notify_all();
  }
}

void AdapterCache::State::on_pool_eviction(Owner owner) {
  if (owner.kind != OwnerKind::kAdapter) return;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = entries.find(static_cast<int64_t>(owner.id));
  if (it == entries.end()) return;
  AdapterEntry& e = *it->second;
  // Only a resident adapter's pages are ours to forget; a stale event (the owner was allocated
  // again since) leaves the pool holding the owner.
  if (e.device_state != DeviceState::kResident || pool.contains(owner)) return;
  drop_device_locked(e, false);
  ++counters.device_evictions;
  changed.notify_all();
}

AdapterCache::AdapterCache(PagePool& pool, CopyEngine& copies, AdapterCacheConfig config)
    : state_(std::make_unique<State>(pool, copies, std::move(config))) {
  State& s = *state_;
  const auto& cfg = s.config;
  MOELORA_CHECK_ARG(cfg.max_loras >= 1, "max_loras must be >= 1, got " + std::to_string(cfg.max_loras));
  MOELORA_CHECK_ARG(cfg.max_lora_rank >= 1,
                    "max_lora_rank must be >= 1, got " + std::to_string(cfg.max_lora_rank));
  MOELORA_CHECK_ARG(cfg.max_cpu_loras >= 0, "max_cpu_loras must be >= 0");
  MOELORA_CHECK_ARG(cfg.max_cpu_bytes >= 0, "max_cpu_bytes must be >= 0");
  MOELORA_CHECK_ARG(cfg.host_threads >= 1 && cfg.host_threads <= 64,
                    "host_threads must be in [1, 64], got " + std::to_string(cfg.host_threads));
  MOELORA_CHECK_ARG(cfg.read_chunk_bytes >= 4096 && cfg.read_chunk_bytes <= (int64_t{1} << 30),
                    "read_chunk_bytes must be in [4096, 1 GiB], got " +
                        std::to_string(cfg.read_chunk_bytes));
  MOELORA_CHECK_ARG(cfg.host_block_bytes >= 0,
                    "host_block_bytes must be >= 0, got " + std::to_string(cfg.host_block_bytes));
  MOELORA_CHECK_ARG(cfg.host_reserve_bytes >= 0, "host_reserve_bytes must be >= 0, got " +
                                                     std::to_string(cfg.host_reserve_bytes));
  MOELORA_CHECK_ARG(cfg.host_reserve_bytes == 0 || cfg.host_block_bytes > 0,
                    "host_reserve_bytes needs host_block_bytes > 0 (the reserve is made of "
                    "blocks)");
  MOELORA_CHECK_ARG(cfg.pack_threads >= 0 && cfg.pack_threads <= 64,
                    "pack_threads must be in [0, 64] (0: automatic), got " +
                        std::to_string(cfg.pack_threads));
  MOELORA_CHECK_ARG(cfg.dtype == DType::kFloat32 || cfg.dtype == DType::kFloat16 ||
                        cfg.dtype == DType::kBFloat16,
                    std::string("dtype must be float32, float16 or bfloat16, got ") +
                        dtype_name(cfg.dtype));
  s.host_row_offsets.assign(cfg.max_loras * s.table.entries_per_slot(), 0);
  s.host_ranks.assign(cfg.max_loras * s.table.rank_entries_per_slot(), 0);
  s.zero_ranks.assign(s.table.rank_entries_per_slot(), 0);
  s.slot_owner.assign(cfg.max_loras, -1);
  s.slot_clear_ticket.assign(cfg.max_loras, kNoCopyTicket);
  if (pool.arena().device() == DeviceKind::kCUDA) {
    s.device_table = true;
    s.device_index = pool.arena().device_index();
    const int64_t row_bytes = static_cast<int64_t>(s.host_row_offsets.size() * sizeof(int64_t));
    const int64_t rank_bytes = static_cast<int64_t>(s.host_ranks.size() * sizeof(int32_t));
    s.device_row_offsets = static_cast<int64_t*>(detail::device_alloc(row_bytes, s.device_index));
    s.device_ranks = static_cast<int32_t*>(detail::device_alloc(rank_bytes, s.device_index));
    copies.wait(copies.submit({{s.device_row_offsets, s.host_row_offsets.data(), row_bytes},
                               {s.device_ranks, s.host_ranks.data(), rank_bytes}}));
  }
  s.link->state = &s;
  std::weak_ptr<ListenerLink> weak_link = s.link;
  pool.add_eviction_listener([weak_link](Owner owner) {
    auto link = weak_link.lock();
    if (!link) return;
    std::lock_guard<std::mutex> guard(link->mutex);
    if (link->state) link->state->on_pool_eviction(owner);
  });
  s.buffers = std::make_shared<detail::HostBlockPool>(s.config.host_reserve_bytes,
                                                      s.config.host_block_bytes);
  for (int32_t i = 0; i < s.reader_threads(); ++i) {
    s.readers.emplace_back([&s] { s.reader_loop(); });
  }
  s.finalizer = std::thread([&s] { s.finalizer_loop(); });
  s.starter = std::thread([&s] { s.starter_loop(); });
}

AdapterCache::~AdapterCache() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> guard(s.link->mutex);
    s.link->state = nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.stopping = true;
    for (auto& [id, e] : s.entries) e->cancelled = true;
  }
  s.host_work.notify_all();
  s.copy_work.notify_all();
  s.start_work.notify_all();
  s.starter.join();
  for (std::thread& reader : s.readers) reader.join();
  s.finalizer.join();  // drains in-flight copies first
  s.settle_copies();   // block copies of reads cut short may still read their buffers
  for (const auto& job : s.jobs) {  // their streaming loads' pages (unregistered ones too)
    if (job->streaming) s.pool.free(adapter_owner(static_cast<uint64_t>(job->entry->id)));
  }
  s.jobs.clear();  // loads cut short: their files close, their buffers go
  s.host_queue.clear();
  for (auto& [id, e] : s.entries) s.pool.free(adapter_owner(static_cast<uint64_t>(id)));
  s.settle_copies();  // slot clears read zero_ranks
  if (s.device_table) {
    detail::device_free(s.device_row_offsets, s.device_index);
    detail::device_free(s.device_ranks, s.device_index);
  }
}

int64_t AdapterCache::register_adapter(const AdapterSpec& spec) {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.names.count(spec.name)) throw AdapterError(spec.name, "an adapter of this name is registered");
  }
  EntryPtr e = detail::validate_adapter_spec(spec, s.config, s.pool.page_bytes());
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.names.count(spec.name)) throw AdapterError(spec.name, "an adapter of this name is registered");
  e->id = s.next_id++;
  s.entries[e->id] = e;
  s.names[e->name] = e->id;
  return e->id;
}

void AdapterCache::unregister(int64_t id) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  if (e->acquire_pins > 0) {
    throw InvalidArgument("adapter '" + e->name + "' is acquired " +
                          std::to_string(e->acquire_pins) + " time(s); release it first");
  }
  e->cancelled = true;
  s.entries.erase(id);
  s.names.erase(e->name);
  // Allocating and copying loads are finished by the thread that owns them (they see the flag).
  if (e->device_state == DeviceState::kResident) s.drop_device_locked(*e, true);
  if (e->device_state == DeviceState::kWaiting) e->device_state = DeviceState::kNone;
  s.drop_host_copy_locked(*e);
  if (e->demand != kNoDemand) {
    e->demand = kNoDemand;
    s.demanded.erase(std::find(s.demanded.begin(), s.demanded.end(), e));
  }
  s.changed.notify_all();
}

void AdapterCache::unregister(const std::string& name) { unregister(id_of(name)); }

int64_t AdapterCache::id_of(const std::string& name) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto it = state_->names.find(name);
  if (it == state_->names.end()) throw NotFound("no adapter named '" + name + "'");
  return it->second;
}

std::vector<int64_t> AdapterCache::adapter_ids() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<int64_t> ids;
  for (const auto& [id, e] : state_->entries) ids.push_back(id);
  return ids;
}

Residency AdapterCache::prefetch(int64_t id, bool in_background) {
  check_not_capturing("AdapterCache::prefetch");
  State& s = *state_;
  EntryPtr e;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    e = s.get_locked(id);
    if (!e->failed && e->device_state == DeviceState::kNone) {
      e->want_device = true;
      if (e->host_state == HostState::kNone) s.queue_host_load_locked(e);
    }
    if (e->device_state == DeviceState::kResident) {
      e->device_lru = ++s.lru_clock;
      s.pool.touch(adapter_owner(static_cast<uint64_t>(id)));
    }
  }
  if (!in_background) {
    s.try_start_device_load(e);
    s.retry_waiting();
  }
  std::lock_guard<std::mutex> lock(s.mutex);
  if (in_background) s.ask_device_start_locked(e);  // the start looks at its state itself
  return s.residency_locked(*e);
}

void AdapterCache::set_demand(const std::vector<int64_t>& queued_adapters, bool in_background) {
  check_not_capturing("AdapterCache::set_demand");
  State& s = *state_;
  std::vector<EntryPtr> to_start;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    for (const EntryPtr& e : s.demanded) e->demand = kNoDemand;
    s.demanded.clear();
    for (size_t position = 0; position < queued_adapters.size(); ++position) {
      auto it = s.entries.find(queued_adapters[position]);
      if (it == s.entries.end() || it->second->demand != kNoDemand) continue;
      const EntryPtr& e = it->second;
      e->demand = static_cast<int64_t>(position);
      s.demanded.push_back(e);
      if (e->failed || e->device_state != DeviceState::kNone) continue;
      e->want_device = true;
      s.queue_host_load_locked(e);
      to_start.push_back(e);
    }
    // KV allocations evict idle adapters least recently used first: those queued requests
    // wait for become the most recently used, the most urgent last.
    for (auto it = s.demanded.rbegin(); it != s.demanded.rend(); ++it) {
      if ((*it)->device_state == DeviceState::kResident) {
        s.pool.touch(adapter_owner(static_cast<uint64_t>((*it)->id)));
      }
    }
    s.host_work.notify_all();  // the order of reads changed
    if (in_background) {
      for (const EntryPtr& e : to_start) s.ask_device_start_locked(e);  // in demand order
      s.ask_device_start_locked(nullptr);  // and a retry of those waiting for memory
      return;
    }
  }
  for (const EntryPtr& e : to_start) s.try_start_device_load(e);
  s.retry_waiting();
}

bool AdapterCache::State::device_loads_in_flight_locked() const {
  if (finalizer_busy || !copy_queue.empty()) return true;
  for (const auto& [id, e] : entries) {
    if (e->device_state == DeviceState::kAllocating || e->device_state == DeviceState::kCopying) {
      return true;
    }
  }
  return std::any_of(slot_owner.begin(), slot_owner.end(),
                     [&](int64_t owner) { return owner >= 0 && !entries.count(owner); });
}

int32_t AdapterCache::wait(int64_t id) {
  check_not_capturing("AdapterCache::wait");
  State& s = *state_;
  while (true) {
    prefetch(id);  // waiting implies asking for it; also retries loads waiting for memory
    std::unique_lock<std::mutex> lock(s.mutex);
    EntryPtr e = s.get_locked(id);
    s.changed.wait(lock, [&] {
      return e->cancelled || e->failed || e->device_state == DeviceState::kResident ||
             (e->device_state == DeviceState::kWaiting && e->host_state != HostState::kQueued) ||
             (e->device_state == DeviceState::kNone && !e->want_device);
    });
    if (e->cancelled) throw Cancelled("adapter '" + e->name + "' was unregistered while loading");
    if (e->failed) throw AdapterError(e->name, problem_of(*e));
    if (e->device_state == DeviceState::kWaiting) {
      // Loads still on their way (to the device, or read for a device load that goes first)
      // make room or take their turn when they land: wait for that and ask again; otherwise
      // nothing will change by waiting.
      const bool others_in_flight =
          s.starter_busy || !s.start_queue.empty() ||  // starts asked in the background
          s.device_loads_in_flight_locked() ||
          std::any_of(s.entries.begin(), s.entries.end(), [&](const auto& entry) {
            const AdapterEntry& other = *entry.second;
            return other.want_device && !other.failed &&
                   other.device_state == DeviceState::kNone;  // read, or about to start
          });
      if (others_in_flight) {
        s.changed.wait(lock);
        continue;
      }
      // A slot or pages given back since its last try (after it found no room, before this
      // thread looked): ask again.
      if (s.device_releases != e->releases_when_waiting) continue;
      throw PoolExhausted("adapter '" + e->name + "' is waiting for a slot or " +
                              std::to_string(e->layout->num_pages()) + " free pages",
                          e->layout->num_pages(), s.pool.free_pages());
    }
    if (e->device_state == DeviceState::kResident) return e->slot;
    // Evicted by another load before this thread woke up: ask again.
  }
}

void AdapterCache::make_stream_wait(int64_t id, void* cuda_stream) {
  check_not_capturing("AdapterCache::make_stream_wait");
  State& s = *state_;
  std::vector<CopyTicket> tickets;
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    EntryPtr e = s.get_locked(id);
    s.changed.wait(lock, [&] {
      return e->cancelled || e->failed || e->device_state == DeviceState::kResident ||
             e->device_state == DeviceState::kCopying || !e->want_device ||
             (e->device_state == DeviceState::kWaiting && e->host_state != HostState::kQueued);
    });
    if (e->failed) throw AdapterError(e->name, problem_of(*e));
    if (e->device_state == DeviceState::kCopying) {
      tickets = e->streamed_tickets;
      tickets.push_back(e->ticket);
    } else if (e->device_state != DeviceState::kResident) {
      throw InvalidArgument("adapter '" + e->name + "' is not loading (residency " +
                            residency_name(s.residency_locked(*e)) + ")");
    }
  }
  for (CopyTicket ticket : tickets) {
    if (ticket != kNoCopyTicket) s.copies.make_stream_wait(ticket, cuda_stream);
  }
}

int32_t AdapterCache::acquire(int64_t id) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  if (e->device_state != DeviceState::kResident) {
    throw InvalidArgument("adapter '" + e->name + "' is not resident (residency " +
                          residency_name(s.residency_locked(*e)) + "); prefetch and wait first");
  }
  const Owner owner = adapter_owner(static_cast<uint64_t>(id));
  s.pool.pin(owner);
  s.pool.touch(owner);
  ++e->acquire_pins;
  e->device_lru = ++s.lru_clock;
  return e->slot;
}

void AdapterCache::release(int64_t id) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  if (e->acquire_pins == 0) {
    throw InvalidArgument("adapter '" + e->name + "' released more often than acquired");
  }
  s.pool.unpin(adapter_owner(static_cast<uint64_t>(id)));
  --e->acquire_pins;
}

void AdapterCache::touch(int64_t id) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  EntryPtr e = s.get_locked(id);
  e->host_lru = e->device_lru = ++s.lru_clock;
  if (e->device_state == DeviceState::kResident) {
    s.pool.touch(adapter_owner(static_cast<uint64_t>(id)));
  }
}

Residency AdapterCache::residency(int64_t id) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->residency_locked(*state_->get_locked(id));
}

std::string AdapterCache::error_message(int64_t id) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->get_locked(id)->error;
}

int32_t AdapterCache::slot_of(int64_t id) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  EntryPtr e = state_->get_locked(id);
  return e->device_state == DeviceState::kResident ? e->slot : -1;
}

int64_t AdapterCache::num_pages(int64_t id) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->get_locked(id)->layout->num_pages();
}

LoraSiteView AdapterCache::site_view(int site_index, int layer) const {
  const State& s = *state_;
  const auto& sites = s.config.sites;
  MOELORA_CHECK_ARG(site_index >= 0 && site_index < static_cast<int>(sites.size()),
                    "site_index " + std::to_string(site_index) + " out of range");
  const LoraSite& site = sites[site_index];
  MOELORA_CHECK_ARG(layer >= 0 && layer < site.num_layers,
                    "layer " + std::to_string(layer) + " out of range for site '" + site.name + "'");
  LoraSiteView view;
  view.arena = s.pool.arena().base();
  const int64_t* rows = s.device_table ? s.device_row_offsets : s.host_row_offsets.data();
  const int32_t* ranks = s.device_table ? s.device_ranks : s.host_ranks.data();
  view.row_offsets = rows + s.table.row_base(site_index, layer);
  view.slot_stride = s.table.entries_per_slot();
  view.ranks = ranks + s.table.rank_index(site_index, layer);
  view.rank_slot_stride = s.table.rank_entries_per_slot();
  view.num_slots = s.config.max_loras;
  view.num_experts = site.num_experts;
  view.max_rank = s.config.max_lora_rank;
  view.in_dim = site.in_dim;
  view.out_dim = site.out_dim;
  view.dtype = s.config.dtype;
  return view;
}

const RowTableLayout& AdapterCache::row_table_layout() const { return state_->table; }
int32_t AdapterCache::max_loras() const { return state_->config.max_loras; }

AdapterCacheStats AdapterCache::stats() const {
  const State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  AdapterCacheStats out = s.counters;
  out.registered = static_cast<int64_t>(s.entries.size());
  for (const auto& [id, e] : s.entries) {
    switch (s.residency_locked(*e)) {
      case Residency::kDisk: ++out.on_disk; break;
      case Residency::kHost: ++out.on_host; break;
      case Residency::kLoading: ++out.loading; break;
      case Residency::kDevice: ++out.on_device; break;
      case Residency::kFailed: ++out.failed; break;
      case Residency::kWaitingForMemory: ++out.waiting_for_memory; break;
    }
    if (e->host_state == HostState::kReady) {
      ++out.host_copies;
      out.host_bytes += e->host_copy_bytes();
    }
  }
  out.host_buffers_in_use = s.buffers->buffers_in_use();
  out.host_blocks_kept = s.buffers->kept_blocks();
  out.host_block_bytes_kept = s.buffers->kept_bytes();
  out.host_block_bytes_in_use = s.buffers->bytes_in_use();
  out.host_reserve_blocks_made = s.buffers->reserve_blocks_made();
  out.host_load_histogram = s.host_histogram.counts;
  out.device_load_histogram = s.device_histogram.counts;
  return out;
}

}  // namespace moelora
