// Streaming a cold adapter's read to the device: its device load starts while the reader
// threads still convert its chunks, and each block of the host copy is queued for the device as
// soon as every chunk that writes it is converted. What is left after the last chunk is the
// last blocks and the row table, not the whole copy (~8 ms for a 420 MB GPT-OSS-20B adapter at
// 50 GB/s).
//
// A read streams once its buffer can be copied asynchronously (page-locked, or the CPU copy
// engine) and its device load finds a slot and pages; the device state stays kAllocating (pages
// pinned, slot held) until the read ends. Then the row table is queued after the blocks and the
// load goes to the finalizer, which waits for every ticket; a failed or cancelled read waits for
// its queued copies before its pages and slot go back. A read that cannot stream (a buffer still
// being page-locked, no slot yet) loads from the host copy when the read ends, as before.
#include <algorithm>
#include <chrono>
#include <string>

#include "adapter_cache_state.h"

namespace moelora {

using detail::AdapterEntry;
using detail::DeviceState;
using detail::HostState;

std::shared_ptr<ReadJob> AdapterCache::State::streamable_job_locked(const AdapterEntry& e) const {
  if (e.host_state != HostState::kQueued) return nullptr;
  for (const auto& job : jobs) {
    if (job->entry.get() != &e) continue;
    const bool copyable = copies.device() == DeviceKind::kCPU || job->buffer->pinned();
    if (copyable && !job->pinning && !job->failed && !job->finishing && !job->streaming) {
      return job;
    }
    return nullptr;
  }
  return nullptr;
}

void AdapterCache::State::ask_stream_start_locked(const std::shared_ptr<ReadJob>& job) {
  const AdapterEntry& e = *job->entry;
  const bool startable =
      e.device_state == DeviceState::kNone || e.device_state == DeviceState::kWaiting;
  if (e.want_device && !e.cancelled && !e.failed && startable && streamable_job_locked(e)) {
    ask_device_start_locked(job->entry);
  }
}

void AdapterCache::State::attach_stream_locked(const std::shared_ptr<ReadJob>& job,
                                               std::unique_lock<std::mutex>& lock) {
  AdapterEntry& e = *job->entry;
  job->streaming = true;
  counters.bytes_loaded += e.host_copy_bytes();
  ++counters.device_loads_streamed;
  const std::vector<PageId> pages = e.pages;
  const int32_t slot = e.slot;
  ++job->submitting;  // the row table is being filled: the job may not end meanwhile
  lock.unlock();
  fill_row_table(*e.layout, pages, slot);
  lock.lock();
  --job->submitting;
  queue_converted_blocks_locked(*job, lock);
  changed.notify_all();
  if (job->done()) finish_job_locked(job, lock);
}

void AdapterCache::State::on_chunk_converted_locked(ReadJob& job, size_t index,
                                                    std::unique_lock<std::mutex>& lock) {
  for (int32_t block : job.chunk_blocks[index]) --job.block_writers[block];
  queue_converted_blocks_locked(job, lock);
}

void AdapterCache::State::queue_converted_blocks_locked(ReadJob& job,
                                                        std::unique_lock<std::mutex>& lock) {
  if (!job.streaming || job.failed || job.entry->cancelled) return;
  std::vector<size_t> ready;
  for (size_t b = 0; b < job.block_writers.size(); ++b) {
    if (job.block_writers[b] == 0 && !job.block_queued[b]) {
      job.block_queued[b] = true;
      ready.push_back(b);
    }
  }
  if (ready.empty()) return;
  const AdapterEntry& e = *job.entry;
  const int64_t page_bytes = e.layout->page_bytes();
  const int64_t num_pages = e.layout->num_pages();
  const int64_t block_pages = job.buffer->block_bytes() > 0
                                  ? job.buffer->block_bytes() / page_bytes
                                  : num_pages;
  const std::vector<PageId>& pages = e.pages;  // fixed while the entry is kAllocating
  ++job.submitting;
  lock.unlock();
  std::vector<CopyRegion> regions;
  for (size_t b : ready) {
    const int64_t first = static_cast<int64_t>(b) * block_pages;
    const int64_t end = std::min(num_pages, first + block_pages);
    for (const CopyRegion& r : page_copy_regions(pool, pages, first, end, *job.buffer,
                                                 page_bytes)) {
      regions.push_back(r);
    }
  }
  CopyTicket ticket = kNoCopyTicket;
  std::string error;
  try {
    ticket = copies.submit(std::move(regions));
  } catch (const std::exception& ex) {
    error = std::string("its copy to the device failed: ") + ex.what();
  } catch (...) {
    error = "its copy to the device failed";
  }
  lock.lock();
  --job.submitting;
  if (ticket != kNoCopyTicket) job.tickets.push_back(ticket);
  if (!error.empty() && !job.failed) {
    job.failed = true;  // the remaining chunks are skipped; the job's end fails the adapter
    job.error = error;
  }
}

void AdapterCache::State::end_stream_locked(ReadJob& job, std::unique_lock<std::mutex>& lock) {
  const EntryPtr e = job.entry;
  if (!job.failed && !e->cancelled) {
    // Every chunk is converted, so every block is queued: the row table goes last.
    const int32_t slot = e->slot;
    lock.unlock();
    CopyTicket ticket = kNoCopyTicket;
    std::string error;
    try {
      ticket = copies.submit(row_table_regions(slot));
    } catch (const std::exception& ex) {
      error = std::string("its copy to the device failed: ") + ex.what();
    } catch (...) {
      error = "its copy to the device failed";
    }
    lock.lock();
    if (error.empty()) {
      // The device tier's latency is what it adds to the read: from here to resident.
      e->load_start = std::chrono::steady_clock::now();
      e->ticket = ticket;
      e->streamed_tickets = job.tickets;
      e->device_state = DeviceState::kCopying;
      copy_queue.push_back({e, ticket, job.buffer});
      copy_work.notify_one();
      changed.notify_all();
      return;
    }
    job.failed = true;
    job.error = error;
  }
  // The read failed or the adapter was unregistered: no copy may still land in the pages (or
  // read the buffer) when they go back.
  const std::vector<CopyTicket> tickets = job.tickets;
  lock.unlock();
  bool confirmed = true;
  for (CopyTicket t : tickets) {
    try {
      copies.wait(t);
    } catch (...) {
      confirmed = false;
    }
  }
  if (!confirmed) settle_copies();
  lock.lock();
  release_device_load_locked(*e);
  changed.notify_all();
}

}  // namespace moelora
