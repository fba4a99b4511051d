// HostBlockPool: see host_block_pool.h.
#include "host_block_pool.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>

#include "moelora/error.h"

namespace moelora::detail {

namespace {

int64_t capacity_of(const std::vector<HostBlock>& blocks) {
  int64_t total = 0;
  for (const HostBlock& b : blocks) total += b.capacity;
  return total;
}

void free_all(const std::vector<HostBlock>& blocks) noexcept {
  for (const HostBlock& b : blocks) free_host_block(b);
}

}  // namespace

HostBlockPool::HostBlockPool(int64_t reserve_bytes, int64_t reserve_block_bytes)
    : reserve_bytes_(reserve_bytes), reserve_block_bytes_(reserve_block_bytes) {
  if (reserve_bytes < 0 || reserve_block_bytes < 0) {
    throw InvalidArgument("a host block pool's reserve must be >= 0, got " +
                          std::to_string(reserve_bytes) + " bytes in blocks of " +
                          std::to_string(reserve_block_bytes));
  }
  if (reserve_bytes > 0 && reserve_block_bytes == 0) {
    throw InvalidArgument("a host block reserve of " + std::to_string(reserve_bytes) +
                          " bytes needs a block size (host_block_bytes > 0)");
  }
}

HostBlockPool::~HostBlockPool() { clear(); }

int64_t HostBlockPool::limit_locked() const {
  return std::max(peak_bytes_in_use_, bytes_in_use_ + reserve_bytes_);
}

size_t HostBlockPool::best_kept_locked(int64_t need) const {
  size_t best = kept_.size();
  for (size_t i = 0; i < kept_.size(); ++i) {
    const HostBlock& b = kept_[i];
    if (b.capacity < need || b.capacity > need + need / 4) continue;
    if (best == kept_.size()) {
      best = i;
      continue;
    }
    const HostBlock& o = kept_[best];
    if (b.pinned() != o.pinned() ? b.pinned() : b.capacity < o.capacity) best = i;
  }
  return best;
}

std::shared_ptr<HostBuffer> HostBlockPool::take(int64_t bytes, int64_t block_bytes) {
  const std::vector<int64_t> layout = HostBuffer::block_layout(bytes, block_bytes);
  std::vector<HostBlock> blocks(layout.size());
  std::vector<HostBlock> dropped;  // kept blocks in the way of new ones: freed unlocked
  int64_t new_bytes = 0;
  int64_t taken_bytes = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < layout.size(); ++i) {
      const size_t found = best_kept_locked(layout[i]);
      if (found == kept_.size()) {
        new_bytes += layout[i];
        continue;
      }
      blocks[i] = kept_[found];
      kept_bytes_ -= blocks[i].capacity;
      kept_[found] = kept_.back();
      kept_.pop_back();
    }
    taken_bytes = capacity_of(blocks) + new_bytes;
    bytes_in_use_ += taken_bytes;
    ++buffers_in_use_;
    if (new_bytes > 0) {
      // New blocks are about to be allocated (the kept ones did not fit them): the largest kept
      // blocks go first, until kept + in use is back within the limit.
      std::sort(kept_.begin(), kept_.end(),
                [](const HostBlock& a, const HostBlock& b) { return a.capacity < b.capacity; });
      while (!kept_.empty() && kept_bytes_ + bytes_in_use_ > limit_locked()) {
        dropped.push_back(kept_.back());
        kept_bytes_ -= kept_.back().capacity;
        kept_.pop_back();
      }
    }
    peak_bytes_in_use_ = std::max(peak_bytes_in_use_, bytes_in_use_);
  }
  free_all(dropped);
  const bool pin_now = block_bytes == 0;
  try {
    for (size_t i = 0; i < layout.size(); ++i) {
      if (blocks[i].data == nullptr) blocks[i] = allocate_host_block(layout[i], pin_now);
    }
  } catch (...) {  // out of memory: the blocks it has go back, kept
    std::lock_guard<std::mutex> lock(mutex_);
    bytes_in_use_ -= taken_bytes;
    --buffers_in_use_;
    for (const HostBlock& b : blocks) {
      if (b.data == nullptr) continue;
      kept_.push_back(b);
      kept_bytes_ += b.capacity;
    }
    throw;
  }
  auto buffer = std::make_unique<HostBuffer>(bytes, block_bytes, std::move(blocks));
  std::weak_ptr<HostBlockPool> pool = weak_from_this();
  return std::shared_ptr<HostBuffer>(buffer.release(), [pool](HostBuffer* b) {
    if (auto alive = pool.lock()) {
      alive->give_back(b);
    } else {
      delete b;
    }
  });
}

void HostBlockPool::give_back(HostBuffer* buffer) noexcept {
  const std::vector<HostBlock> blocks = buffer->release_blocks();
  delete buffer;
  std::vector<HostBlock> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bytes_in_use_ -= capacity_of(blocks);
    --buffers_in_use_;
    for (const HostBlock& b : blocks) {
      if (kept_bytes_ + bytes_in_use_ + b.capacity <= limit_locked()) {
        kept_.push_back(b);
        kept_bytes_ += b.capacity;
      } else {
        dropped.push_back(b);
      }
    }
  }
  free_all(dropped);
}

bool HostBlockPool::wants_reserve_block() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !reserve_failed_ && kept_bytes_ + making_reserve_bytes_ < reserve_bytes_;
}

void HostBlockPool::make_reserve_block(std::chrono::microseconds pause_after_pin) {
  // The capacity of one full block of a blocked copy (its bytes and the slack after them).
  const int64_t capacity = HostBuffer::block_layout(reserve_block_bytes_ + 1,
                                                    reserve_block_bytes_).front();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (reserve_failed_ || kept_bytes_ + making_reserve_bytes_ >= reserve_bytes_) return;
    making_reserve_bytes_ += capacity;
  }
  HostBlock block;
  try {
    block = allocate_host_block(capacity, false);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    making_reserve_bytes_ -= capacity;
    reserve_failed_ = true;  // out of host memory: no more blocks are made ahead
    throw;
  }
  std::memset(block.data, 0, static_cast<size_t>(capacity));  // faults every page in now
  {
    std::lock_guard<std::mutex> pinning(pin_mutex_);
    // no pause where nothing was page-locked (no CUDA): no driver lock was held
    if (pin_host_block(block) && pause_after_pin.count() > 0) {
      std::this_thread::sleep_for(pause_after_pin);
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  making_reserve_bytes_ -= capacity;
  reserve_blocks_made_ += 1;
  kept_.push_back(block);
  kept_bytes_ += capacity;
}

int64_t HostBlockPool::kept_blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(kept_.size());
}

int64_t HostBlockPool::kept_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return kept_bytes_;
}

int64_t HostBlockPool::buffers_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return buffers_in_use_;
}

int64_t HostBlockPool::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_in_use_;
}

int64_t HostBlockPool::reserve_blocks_made() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reserve_blocks_made_;
}

void HostBlockPool::clear() {
  std::vector<HostBlock> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dropped.swap(kept_);
    kept_bytes_ = 0;
  }
  free_all(dropped);
}

}  // namespace moelora::detail
