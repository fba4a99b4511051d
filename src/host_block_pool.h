// The host blocks behind adapter host copies, kept and reused across loads.
//
// Fresh host memory costs a cold load twice: every page faults in, and page-locking it holds the
// CUDA driver's lock that a decode step's launches wait for (bench cold-ttft on an H100: steps
// of up to 22 ms beside a load against 4 ms, and ~110 ms of page-locking per GPT-OSS adapter).
// So the blocks of finished copies (an eviction, an
// unregister, a failed read) come back here faulted in and page-locked, and the next copies
// are assembled from them block by block, whatever their sizes. A reserve of ready blocks,
// made ahead by idle reader threads (faulted in, page-locked one block at a time) and made
// again as loads take it, takes both costs off the path of loads that find no kept block.
//
// Blocks kept plus blocks in use stay within the larger of the most bytes ever in use at once
// (the host tier's peak) and the bytes in use plus the reserve. Kept blocks that no copy can
// use are freed before a new block is allocated.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "moelora/copy_engine.h"

namespace moelora::detail {

class HostBlockPool : public std::enable_shared_from_this<HostBlockPool> {
 public:
  // reserve_bytes: ready bytes to keep made ahead, in blocks of reserve_block_bytes (0: none).
  explicit HostBlockPool(int64_t reserve_bytes = 0, int64_t reserve_block_bytes = 0);
  ~HostBlockPool();  // frees the kept blocks; buffers still out free theirs when they go
  HostBlockPool(const HostBlockPool&) = delete;
  HostBlockPool& operator=(const HostBlockPool&) = delete;
  // A buffer of `bytes` in blocks of `block_bytes` (HostBuffer::block_layout). Each block is a
  // kept one at most a quarter larger than needed (page-locked preferred, then the smallest)
  // or a new one: ordinary memory left for the taker to page-lock with pin_block, or, for a
  // buffer of one block (block_bytes 0), page-locked when allocated. The blocks come back here
  // when the buffer's last reference goes.
  std::shared_ptr<HostBuffer> take(int64_t bytes, int64_t block_bytes = 0);

  // True while the blocks kept ready and those being made fall short of reserve_bytes (after
  // an allocation failed, never again).
  bool wants_reserve_block() const;
  // Makes one block of the reserve: faulted in, then page-locked where CUDA allows, then (if
  // it was) `pause_after_pin` elapses. Several threads may make blocks at once: faulting pages
  // in runs in parallel (one thread faults a VM's memory in at a fraction of what four do), while
  // page-locking, which holds the CUDA driver's lock that a step's launches wait for, takes one
  // block at a time and leaves the pause after each. Throws InvalidArgument when out of host
  // memory.
  void make_reserve_block(std::chrono::microseconds pause_after_pin = {});

  int64_t kept_blocks() const;
  int64_t kept_bytes() const;
  int64_t buffers_in_use() const;  // taken and not yet back
  int64_t bytes_in_use() const;
  int64_t reserve_blocks_made() const;
  void clear();  // frees the kept blocks

 private:
  void give_back(HostBuffer* buffer) noexcept;
  int64_t limit_locked() const;
  size_t best_kept_locked(int64_t need) const;  // kept_.size(): none fits

  mutable std::mutex mutex_;  // a leaf: no CUDA call and no other lock while held
  const int64_t reserve_bytes_;
  const int64_t reserve_block_bytes_;
  int64_t reserve_blocks_made_ = 0;
  int64_t making_reserve_bytes_ = 0;  // of blocks being made now
  std::mutex pin_mutex_;  // page-locking, one reserve block at a time (make_reserve_block)
  bool reserve_failed_ = false;
  int64_t buffers_in_use_ = 0;
  int64_t bytes_in_use_ = 0;
  int64_t peak_bytes_in_use_ = 0;
  int64_t kept_bytes_ = 0;
  std::vector<HostBlock> kept_;
};

}  // namespace moelora::detail
