// Asynchronous bulk copies (host -> device for adapter loads) and the pinned host buffers they
// read from. A submitted copy always completes; its ticket says when.
//
// Tickets are increasing integers, one per submit; 0 means "nothing to wait for". On the CPU a
// single worker thread runs copies in submission order. On CUDA, copies run on dedicated
// non-blocking streams and each ticket records an event, so compute streams can wait on the
// GPU (make_stream_wait) for exactly the loads a batch needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "moelora/tensor_ref.h"

namespace moelora {

struct CopyRegion {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t bytes = 0;
};

using CopyTicket = uint64_t;
constexpr CopyTicket kNoCopyTicket = 0;

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  // Queues the regions as one unit of work; the caller keeps src and dst valid until the ticket
  // is done. Throws InvalidArgument for null pointers or negative sizes (nothing is queued).
  virtual CopyTicket submit(std::vector<CopyRegion> regions) = 0;
  // True once every region of `ticket` has been copied (kNoCopyTicket is always done).
  virtual bool is_done(CopyTicket ticket) = 0;
  // Blocks the calling thread until `ticket` is done.
  virtual void wait(CopyTicket ticket) = 0;
  // Makes `cuda_stream` (a cudaStream_t) wait for `ticket` without blocking the host
  // (cudaStreamWaitEvent). Engines without a GPU just wait.
  virtual void make_stream_wait(CopyTicket ticket, void* cuda_stream) = 0;
  // Blocks until every ticket submitted so far is done.
  virtual void synchronize() = 0;
  virtual DeviceKind device() const = 0;
};

// A background worker thread running memcpy over a FIFO queue.
std::unique_ptr<CopyEngine> make_cpu_copy_engine();
// Copies on `num_streams` dedicated non-blocking streams of GPU `device_index` (tickets are
// spread round-robin). Adjacent regions are coalesced into runs; when no run writes bytes that
// another run writes or reads, a submission's runs go to the driver as one
// cudaMemcpyBatchAsync (one cudaMemcpyAsync per run where the driver has no batched copies),
// and a large submission is spread over the streams; otherwise its runs are copied one by one
// in order. Throws CudaError when the library was built without CUDA or the GPU is absent.
std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device_index = 0, int num_streams = 2);

// CUDA graph capture and copies. A thread capturing a CUDA graph holds a GraphCaptureScope for
// the capture's duration. While it does:
//  - on that thread, every copy-engine or adapter-cache call that could synchronise with the GPU
//    or block on a load (CopyEngine::wait / is_done / synchronize, AdapterCache::wait / load_host
//    / prefetch / make_stream_wait) throws InvalidArgument instead: a synchronising call inside a
//    capture would invalidate it;
//  - page-locked host memory released by any thread (HostBuffer) is freed only once no scope is
//    held anywhere, since cudaFreeHost synchronises the device, which an active capture forbids;
//    a HostBuffer made meanwhile gets ordinary memory instead of page-locked memory.
// Worker threads of the adapter cache set their CUDA capture interaction mode to relaxed, so a
// capture begun elsewhere in the process in the global mode cannot make their waits fail.
// Scopes nest and may be held on several threads at once.
class GraphCaptureScope {
 public:
  GraphCaptureScope();
  ~GraphCaptureScope();
  GraphCaptureScope(const GraphCaptureScope&) = delete;
  GraphCaptureScope& operator=(const GraphCaptureScope&) = delete;
};
// True while the calling thread holds a GraphCaptureScope.
bool this_thread_capturing();
// True while any thread holds a GraphCaptureScope (page-locking is refused meanwhile).
bool graph_capture_in_progress();
// Throws InvalidArgument naming `operation` when the calling thread holds a GraphCaptureScope.
void check_not_capturing(const char* operation);

// One allocation of host memory behind a HostBuffer: page-locked when allocated
// (cudaHostAlloc), ordinary memory page-locked in place (cudaHostRegister), or ordinary.
struct HostBlock {
  enum class Memory : uint8_t { kOrdinary, kAllocatedPinned, kRegistered };
  std::byte* data = nullptr;
  int64_t capacity = 0;  // bytes allocated
  Memory memory = Memory::kOrdinary;
  bool pinned() const { return memory != Memory::kOrdinary; }
};
// A block of `capacity` bytes: page-locked when `pinned` (and CUDA, a GPU and no graph capture
// allow it), else 4 KiB-aligned ordinary memory. Throws InvalidArgument when out of memory.
HostBlock allocate_host_block(int64_t capacity, bool pinned);
// Page-locks an ordinary block in place (not while this process captures a CUDA graph, nor
// without CUDA); true when it is page-locked afterwards.
bool pin_host_block(HostBlock& block);
// Frees a block (a page-locked free during a graph capture waits for the capture's end).
void free_host_block(const HostBlock& block) noexcept;
// Bytes of host blocks allocated and not yet freed, in this process (every owner).
int64_t host_block_bytes_allocated() noexcept;

// Host memory for staging copies: page-locked when the build has CUDA and a GPU is present,
// `try_pinned` is set and no GraphCaptureScope is held, otherwise 4 KiB-aligned ordinary memory.
// Movable RAII.
//
// block_bytes > 0 allocates (and page-locks) the buffer as separate blocks of that many bytes
// (the last one shorter): page-locking holds the CUDA driver's lock for as long as it takes
// (~0.2 s for 400 MB on an H100 host), and every other thread's CUDA call (a decode step's
// launches) waits for it, so a large buffer is locked a block at a time. Byte ranges that do not
// cross a multiple of block_bytes are contiguous; at() finds them. With `pin_later` the blocks
// start as ordinary memory and pin_block() page-locks them in place, one at a time, so that a
// caller can fill the buffer meanwhile.
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(int64_t bytes, bool try_pinned = true, int64_t block_bytes = 0,
                      bool pin_later = false);
  // Adopts `blocks` (from a pool): block_layout(bytes, block_bytes) many, each at least as
  // large as that layout's block. Throws InvalidArgument otherwise (and then frees nothing:
  // the blocks stay the caller's).
  HostBuffer(int64_t bytes, int64_t block_bytes, std::vector<HostBlock> blocks);
  ~HostBuffer();
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  // The capacity of each block a buffer of `bytes` in blocks of `block_bytes` needs: one
  // block of `bytes` when block_bytes is 0 or not below bytes, otherwise full blocks and a
  // shorter last one, each a little longer than its bytes (two blocks never touch: a copy
  // engine merges regions whose addresses continue, and one copy may not span two page-locked
  // allocations).
  static std::vector<int64_t> block_layout(int64_t bytes, int64_t block_bytes);

  // The first block: the whole buffer when it has one.
  std::byte* data() const { return blocks_.empty() ? nullptr : blocks_.front().data; }
  // Byte `offset` of the buffer.
  std::byte* at(int64_t offset) const {
    if (block_bytes_ == 0) return blocks_.front().data + offset;
    return blocks_[static_cast<size_t>(offset / block_bytes_)].data + offset % block_bytes_;
  }
  int64_t bytes() const { return bytes_; }
  int64_t block_bytes() const { return block_bytes_; }  // 0: one block
  bool pinned() const;                                  // every block page-locked
  size_t num_blocks() const { return blocks_.size(); }
  bool block_pinned(size_t i) const { return blocks_[i].pinned(); }
  // Page-locks block i in place (not while this process captures a CUDA graph, nor without
  // CUDA); true when it is page-locked afterwards.
  bool pin_block(size_t i);
  // Gives up the blocks, unfreed (to a pool); the buffer is empty afterwards.
  std::vector<HostBlock> release_blocks() noexcept;

 private:
  void release() noexcept;
  std::vector<HostBlock> blocks_;
  int64_t bytes_ = 0;
  int64_t block_bytes_ = 0;
};

}  // namespace moelora
