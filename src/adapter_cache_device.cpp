// The adapter cache's device loads: where they start (a slot, pages, the row table, the copy
// queued), on the starter thread. The engine's step only asks (prefetch, set_demand): starting a
// load allocates pages (evicting), fills the slot's row table and queues the copy's page runs,
// which a decode step must not wait for.
// Reader threads start the loads whose host copies they finish themselves. A load asked for
// while its adapter is still read streams from that read (adapter_cache_stream.cpp).
// Lock order: pool allocation (which runs eviction listeners) is never called with mutex held.
#include <algorithm>

#include "adapter_cache_state.h"
#include "copy_engine_internal.h"
#include "moelora/error.h"

namespace moelora {

using detail::AdapterEntry;
using detail::DeviceState;
using detail::HostState;
using detail::kNoDemand;

void AdapterCache::State::ask_device_start_locked(const EntryPtr& e) {
  if (e && !e->start_asked) {
    e->start_asked = true;
    start_queue.push_back(e);
  }
  retry_wanted = true;
  start_work.notify_one();
}

void AdapterCache::State::starter_loop() {
  if (device_table) detail::relax_capture_mode_of_this_thread();
  std::unique_lock<std::mutex> lock(mutex);
  while (true) {
    starter_busy = false;
    start_work.wait(lock, [&] { return stopping || !start_queue.empty() || retry_wanted; });
    if (stopping) return;
    std::deque<EntryPtr> batch;
    batch.swap(start_queue);
    for (const EntryPtr& e : batch) e->start_asked = false;
    retry_wanted = false;
    starter_busy = true;
    lock.unlock();
    for (const EntryPtr& e : batch) try_start_device_load(e);  // in the order asked
    retry_waiting();
    lock.lock();
    changed.notify_all();  // a waiter may look again, whatever the loads did
  }
}

void AdapterCache::State::try_start_device_load(const EntryPtr& e) noexcept {
  try {
    start_device_load(e);
  } catch (const std::exception& ex) {
    on_device_load_error(e, ex.what());
  } catch (...) {
    on_device_load_error(e, "unknown error while starting its load");
  }
}

void AdapterCache::State::on_device_load_error(const EntryPtr& e,
                                               const std::string& what) noexcept {
  try {
    bool had_pages = false;
    {
      std::lock_guard<std::mutex> lock(mutex);
      had_pages = e->device_state == DeviceState::kAllocating && !e->pages.empty();
    }
    if (had_pages) settle_copies();  // part of its copy may have been queued
    std::lock_guard<std::mutex> lock(mutex);
    if (e->device_state == DeviceState::kAllocating) release_device_load_locked(*e);
    if (!e->cancelled) fail_locked(*e, what);
  } catch (...) {  // bookkeeping of a broken state: nothing more can be done safely
  }
}

void AdapterCache::State::release_device_load_locked(AdapterEntry& e) {
  pool.free(adapter_owner(static_cast<uint64_t>(e.id)));  // its pin, and pages if any
  if (e.slot >= 0) {
    try {
      clear_slot_locked(e.slot);
    } catch (...) {  // a stale row table of a slot that nobody uses is harmless
      slot_owner[e.slot] = -1;
      ++device_releases;
    }
  }
  e.slot = -1;
  e.pages.clear();
  e.device_state = DeviceState::kNone;
}

void AdapterCache::State::start_device_load(const EntryPtr& e) {
  const Owner owner = adapter_owner(static_cast<uint64_t>(e->id));
  int64_t pages_needed = 0;
  // Resident adapters this load may not evict (queued requests want them sooner), pinned while
  // the pool looks for pages so that its LRU eviction passes them over.
  std::vector<std::pair<EntryPtr, uint64_t>> spared;  // with their device generation
  CopyTicket slot_cleared = kNoCopyTicket;  // the previous owner's rank zeroing
  {
    std::unique_lock<std::mutex> lock(mutex);
    if (e->cancelled || e->failed || !e->want_device) return;
    if (e->device_state != DeviceState::kNone && e->device_state != DeviceState::kWaiting) return;
    // Without a host copy, the load streams from the read in progress when it can; otherwise
    // the reader that finishes the host copy (or makes it streamable) starts the load.
    if (e->host_state != HostState::kReady && !streamable_job_locked(*e)) {
      queue_host_load_locked(e);
      return;
    }
    if (e->layout->num_pages() > pool.num_pages()) {
      // Waiting could never help: fail the adapter (and so its requests) instead.
      e->device_state = DeviceState::kNone;
      fail_locked(*e, "needs " + std::to_string(e->layout->num_pages()) + " pages of " +
                          std::to_string(e->layout->page_bytes()) +
                          " bytes, more than the whole page pool holds (" +
                          std::to_string(pool.num_pages()) + " pages)");
      return;
    }
    int32_t slot = find_slot_locked(*e);
    if (slot < 0) {
      e->device_state = DeviceState::kWaiting;
      e->releases_when_waiting = device_releases;
      changed.notify_all();
      return;
    }
    // The zeroing of the previous owner's ranks must land before the new entries do: waited
    // for below, without the mutex (it may queue behind another adapter's copy).
    slot_cleared = slot_clear_ticket[slot];
    slot_clear_ticket[slot] = kNoCopyTicket;
    slot_owner[slot] = e->id;
    e->slot = slot;
    e->device_state = DeviceState::kAllocating;
    e->load_start = std::chrono::steady_clock::now();
    pages_needed = e->layout->num_pages();
    // Pinned before its pages exist, so no other allocation can evict them before the copy.
    pool.pin(owner);
    for (const auto& [id, other] : entries) {
      if (other->device_state == DeviceState::kResident && other->acquire_pins == 0 &&
          !may_evict(*other, *e)) {
        spared.emplace_back(other, other->device_generation);
        pool.pin(adapter_owner(static_cast<uint64_t>(id)));
      }
    }
  }
  copies.wait(slot_cleared);
  AllocationOutcome outcome = pool.try_allocate(owner, pages_needed, Eviction::kIdleAdapters);

  std::unique_lock<std::mutex> lock(mutex);
  for (const auto& [other, generation] : spared) {
    // Unless its pages were freed meanwhile (which forgets their pins).
    if (other->device_generation == generation) {
      pool.unpin(adapter_owner(static_cast<uint64_t>(other->id)));
    }
  }
  auto give_back_slot = [&] {
    slot_owner[e->slot] = -1;
    ++device_releases;
    e->slot = -1;
  };
  // An adapter still being read streams from its read. When that read can no longer stream (it
  // is ending, or failed), the slot and pages go back: the reader that ends it starts the load
  // again from the host copy, or fails the adapter.
  std::shared_ptr<ReadJob> stream;
  if (e->host_state != HostState::kReady) stream = streamable_job_locked(*e);
  const bool read_ended = e->host_state != HostState::kReady && !stream;
  if (e->cancelled || e->failed || !outcome.ok || read_ended) {
    pool.free(owner);  // forgets the pin, and the pages when there are any
    give_back_slot();
    const bool wait_for_memory = !outcome.ok && !e->cancelled && !e->failed;
    e->device_state = wait_for_memory ? DeviceState::kWaiting : DeviceState::kNone;
    e->releases_when_waiting = device_releases;
    changed.notify_all();
    return;
  }
  e->pages = outcome.pages;
  const AdapterRowLayout& layout = *e->layout;
  pool.set_used_bytes(owner, layout.used_bytes());
  if (stream) {
    attach_stream_locked(stream, lock);
    return;
  }
  // The row table and the copy are built and queued without the mutex: every other call into
  // the cache (a step's readiness checks) would otherwise wait for the table and the driver
  // calls that queue the page runs. Meanwhile the entry stays kAllocating: its pages
  // are pinned, its host copy is held here, its slot is its own; an unregister meanwhile only
  // marks it cancelled, and the finalizer frees its pages once the copy lands.
  const std::vector<PageId> pages = e->pages;
  const std::shared_ptr<HostBuffer> source = e->host;
  const int32_t slot = e->slot;
  lock.unlock();
  const CopyTicket ticket = queue_device_copy(layout, pages, *source, slot);
  lock.lock();
  e->ticket = ticket;
  e->device_state = DeviceState::kCopying;
  counters.bytes_loaded += layout.num_pages() * layout.page_bytes();
  copy_queue.push_back({e, ticket, source});
  copy_work.notify_one();
  changed.notify_all();
}

CopyTicket AdapterCache::State::queue_device_copy(const AdapterRowLayout& layout,
                                                  const std::vector<PageId>& pages,
                                                  const HostBuffer& source, int32_t slot) {
  fill_row_table(layout, pages, slot);
  std::vector<CopyRegion> regions =
      page_copy_regions(pool, pages, 0, static_cast<int64_t>(pages.size()), source,
                        layout.page_bytes());
  for (const CopyRegion& r : row_table_regions(slot)) regions.push_back(r);
  return copies.submit(std::move(regions));
}

void AdapterCache::State::fill_row_table(const AdapterRowLayout& layout,
                                         const std::vector<PageId>& pages, int32_t slot) {
  const std::byte* arena_base = pool.arena().base();
  const int64_t page_bytes = layout.page_bytes();
  int64_t* slot_rows = host_row_offsets.data() + slot * table.entries_per_slot();
  int32_t* slot_ranks = host_ranks.data() + slot * table.rank_entries_per_slot();
  const auto& sites = config.sites;
  for (size_t s = 0; s < sites.size(); ++s) {
    for (int l = 0; l < sites[s].num_layers; ++l) {
      const int32_t rank = layout.rank(static_cast<int>(s), l);
      slot_ranks[table.rank_index(static_cast<int>(s), l)] = rank;
      for (int x = 0; x < sites[s].num_experts; ++x) {
        for (bool is_b : {false, true}) {
          for (int r = 0; r < rank; ++r) {
            const int64_t packed = layout.row_offset(static_cast<int>(s), l, x, is_b, r);
            const std::byte* address =
                pool.page_address(pages[packed / page_bytes]) + packed % page_bytes;
            slot_rows[table.row_index(static_cast<int>(s), l, x, is_b, r)] = address - arena_base;
          }
        }
      }
    }
  }
}

std::vector<CopyRegion> AdapterCache::State::row_table_regions(int32_t slot) {
  if (!device_table) return {};
  return {{device_row_offsets + slot * table.entries_per_slot(),
           host_row_offsets.data() + slot * table.entries_per_slot(),
           table.entries_per_slot() * int64_t{sizeof(int64_t)}},
          {device_ranks + slot * table.rank_entries_per_slot(),
           host_ranks.data() + slot * table.rank_entries_per_slot(),
           table.rank_entries_per_slot() * int64_t{sizeof(int32_t)}}};
}

std::vector<CopyRegion> page_copy_regions(PagePool& pool, const std::vector<PageId>& pages,
                                          int64_t first, int64_t end, const HostBuffer& source,
                                          int64_t page_bytes) {
  std::vector<CopyRegion> regions;
  for (int64_t i = first; i < end; ++i) {
    std::byte* dst = pool.page_address(pages[i]);
    const std::byte* src = source.at(i * page_bytes);
    if (i > first && pages[i] == pages[i - 1] + 1 &&
        static_cast<const std::byte*>(regions.back().src) + regions.back().bytes == src) {
      regions.back().bytes += page_bytes;  // a maximal run of consecutive pages: one copy
    } else {
      regions.push_back({dst, src, page_bytes});
    }
  }
  return regions;
}

void AdapterCache::State::retry_waiting() {
  std::vector<EntryPtr> waiting;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& [id, e] : entries) {
      if (e->device_state == DeviceState::kWaiting &&
          (e->host_state == HostState::kReady || streamable_job_locked(*e))) {
        waiting.push_back(e);
      } else if (e->device_state == DeviceState::kWaiting && e->host_state == HostState::kNone) {
        queue_host_load_locked(e);
      }
    }
    // The most urgent first: a slot that frees goes to the request furthest ahead.
    std::stable_sort(waiting.begin(), waiting.end(), [](const EntryPtr& a, const EntryPtr& b) {
      return a->demand < b->demand;
    });
  }
  for (const EntryPtr& e : waiting) {
    try_start_device_load(e);
    std::lock_guard<std::mutex> lock(mutex);
    // Still waiting: those behind it wait too (find_slot_locked serves the most urgent first).
    if (e->device_state == DeviceState::kWaiting && e->demand != kNoDemand) return;
  }
}

}  // namespace moelora
