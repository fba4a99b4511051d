// The CPU copy engine (a worker thread over a FIFO queue), HostBuffer and the graph-capture scope
// that defers page-locked frees while a CUDA graph is captured.
#include "moelora/copy_engine.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <map>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include "copy_engine_internal.h"
#include "moelora/error.h"

namespace moelora {

namespace {

// A page-locked block: allocated so (cudaHostAlloc), or ordinary memory registered in place.
struct PageLocked {
  void* ptr = nullptr;
  bool registered = false;
};

void free_page_locked(const PageLocked& block) noexcept {
  if (block.registered) {
    detail::host_unregister(block.ptr);
    std::free(block.ptr);
  } else {
    detail::pinned_host_free(block.ptr);
  }
}

// Captures in progress, process-wide, and the page-locked blocks released meanwhile.
struct CaptureState {
  std::mutex mutex;
  int active = 0;
  std::vector<PageLocked> deferred_frees;
};

void release_deferred(CaptureState& state) {
  for (const PageLocked& block : state.deferred_frees) free_page_locked(block);
  state.deferred_frees.clear();
}

CaptureState& capture_state() {
  static CaptureState* state = new CaptureState;  // never destroyed: used from static dtors
  return *state;
}

thread_local int t_capture_depth = 0;

// Page-locked memory is allocated (or registered) and freed with the capture state's mutex
// held, so that no capture (entered through a GraphCaptureScope) begins during either call:
// during a capture page-locking is refused (the caller keeps ordinary memory) and a free waits
// for the capture's end.
void* allocate_pinned(int64_t bytes) {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.active > 0) return nullptr;
  return detail::try_pinned_host_alloc(bytes);
}

bool register_pinned(void* ptr, int64_t bytes) {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.active > 0) return false;
  return detail::try_host_register(ptr, bytes);
}

void release_page_locked(const PageLocked& block) noexcept {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.active > 0) {
    state.deferred_frees.push_back(block);
    return;
  }
  release_deferred(state);
  free_page_locked(block);
}

void check_regions(const std::vector<CopyRegion>& regions) {
  for (size_t i = 0; i < regions.size(); ++i) {
    const CopyRegion& r = regions[i];
    if (r.bytes < 0) {
      throw InvalidArgument("copy region " + std::to_string(i) + " has negative bytes " +
                            std::to_string(r.bytes));
    }
    if (r.bytes > 0 && (r.dst == nullptr || r.src == nullptr)) {
      throw InvalidArgument("copy region " + std::to_string(i) + " has a null pointer");
    }
  }
}

class CpuCopyEngine final : public CopyEngine {
 public:
  CpuCopyEngine() : worker_([this] { run(); }) {}

  ~CpuCopyEngine() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    work_ready_.notify_all();
    worker_.join();  // the worker drains the queue first: a submitted copy always completes
  }

  CopyTicket submit(std::vector<CopyRegion> regions) override {
    check_regions(regions);
    CopyTicket ticket;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ticket = ++last_submitted_;
      queue_.push_back({ticket, std::move(regions)});
    }
    work_ready_.notify_one();
    return ticket;
  }

  bool is_done(CopyTicket ticket) override {
    check_not_capturing("CopyEngine::is_done");
    std::lock_guard<std::mutex> lock(mutex_);
    return ticket <= last_completed_;
  }

  void wait(CopyTicket ticket) override {
    check_not_capturing("CopyEngine::wait");
    std::unique_lock<std::mutex> lock(mutex_);
    if (ticket > last_submitted_) {
      throw InvalidArgument("copy ticket " + std::to_string(ticket) + " was never submitted");
    }
    work_done_.wait(lock, [&] { return ticket <= last_completed_; });
    auto failed = failed_.find(ticket);
    if (failed != failed_.end()) throw InternalError(failed->second);
  }

  void make_stream_wait(CopyTicket ticket, void* cuda_stream) override { wait(ticket); }

  void synchronize() override {
    check_not_capturing("CopyEngine::synchronize");
    std::unique_lock<std::mutex> lock(mutex_);
    work_done_.wait(lock, [&] { return last_completed_ == last_submitted_; });
  }

  DeviceKind device() const override { return DeviceKind::kCPU; }

 private:
  struct Job {
    CopyTicket ticket;
    std::vector<CopyRegion> regions;
  };

  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      Job job = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      std::string error;
      try {
        for (const CopyRegion& r : job.regions) {
          if (r.bytes > 0) std::memcpy(r.dst, r.src, static_cast<size_t>(r.bytes));
        }
      } catch (const std::exception& e) {  // nothing may escape the worker: the ticket fails
        error = std::string("copy ticket ") + std::to_string(job.ticket) + " failed: " + e.what();
      } catch (...) {
        error = "copy ticket " + std::to_string(job.ticket) + " failed";
      }
      lock.lock();
      if (!error.empty()) failed_[job.ticket] = error;
      last_completed_ = job.ticket;  // FIFO: every earlier ticket is done too
      work_done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  std::deque<Job> queue_;
  CopyTicket last_submitted_ = 0;
  CopyTicket last_completed_ = 0;
  std::map<CopyTicket, std::string> failed_;  // tickets whose copy threw; wait() reports them
  bool stopping_ = false;
  std::thread worker_;  // last: started after every other member exists
};

constexpr size_t kHostAlignment = 4096;

}  // namespace

std::unique_ptr<CopyEngine> make_cpu_copy_engine() { return std::make_unique<CpuCopyEngine>(); }

GraphCaptureScope::GraphCaptureScope() {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  ++state.active;
  ++t_capture_depth;
}

GraphCaptureScope::~GraphCaptureScope() {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  --t_capture_depth;
  if (--state.active > 0) return;
  release_deferred(state);
}

bool this_thread_capturing() { return t_capture_depth > 0; }

bool graph_capture_in_progress() {
  CaptureState& state = capture_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  return state.active > 0;
}

void check_not_capturing(const char* operation) {
  if (t_capture_depth > 0) {
    throw InvalidArgument(std::string(operation) +
                          " would synchronise while this thread captures a CUDA graph; load "
                          "and wait for adapters before capturing");
  }
}

namespace {

std::byte* allocate_ordinary(int64_t bytes) {
  const size_t rounded = (static_cast<size_t>(bytes) + kHostAlignment - 1) / kHostAlignment *
                         kHostAlignment;
  auto* data = static_cast<std::byte*>(std::aligned_alloc(kHostAlignment, rounded));
  if (data == nullptr) {
    throw InvalidArgument("cannot allocate a host buffer of " + std::to_string(bytes) + " bytes");
  }
  return data;
}

}  // namespace

namespace {
std::atomic<int64_t> live_host_block_bytes{0};
}  // namespace

int64_t host_block_bytes_allocated() noexcept { return live_host_block_bytes.load(); }

HostBlock allocate_host_block(int64_t capacity, bool pinned) {
  if (capacity <= 0) {
    throw InvalidArgument("a host block needs a positive capacity, got " +
                          std::to_string(capacity));
  }
  HostBlock block;
  block.capacity = capacity;
  if (pinned) block.data = static_cast<std::byte*>(allocate_pinned(capacity));
  if (block.data != nullptr) block.memory = HostBlock::Memory::kAllocatedPinned;
  if (block.data == nullptr) block.data = allocate_ordinary(capacity);
  live_host_block_bytes += capacity;
  return block;
}

bool pin_host_block(HostBlock& block) {
  if (!block.pinned() && register_pinned(block.data, block.capacity)) {
    block.memory = HostBlock::Memory::kRegistered;
  }
  return block.pinned();
}

void free_host_block(const HostBlock& block) noexcept {
  if (block.data == nullptr) return;
  live_host_block_bytes -= block.capacity;
  switch (block.memory) {
    case HostBlock::Memory::kAllocatedPinned: release_page_locked({block.data, false}); break;
    case HostBlock::Memory::kRegistered: release_page_locked({block.data, true}); break;
    case HostBlock::Memory::kOrdinary: std::free(block.data); break;
  }
}

std::vector<int64_t> HostBuffer::block_layout(int64_t bytes, int64_t block_bytes) {
  if (bytes <= 0) return {};
  if (block_bytes <= 0 || block_bytes >= bytes) return {bytes};
  const int64_t slack = static_cast<int64_t>(kHostAlignment);
  std::vector<int64_t> layout;
  for (int64_t offset = 0; offset < bytes; offset += block_bytes) {
    layout.push_back(std::min(block_bytes, bytes - offset) + slack);
  }
  return layout;
}

HostBuffer::HostBuffer(int64_t bytes, bool try_pinned, int64_t block_bytes, bool pin_later) {
  if (bytes < 0) throw InvalidArgument("HostBuffer bytes must be >= 0, got " + std::to_string(bytes));
  if (block_bytes < 0) {
    throw InvalidArgument("HostBuffer block_bytes must be >= 0, got " +
                          std::to_string(block_bytes));
  }
  if (bytes == 0) return;
  block_bytes_ = block_bytes >= bytes ? 0 : block_bytes;
  try {
    for (int64_t capacity : block_layout(bytes, block_bytes_)) {
      blocks_.push_back(allocate_host_block(capacity, try_pinned && !pin_later));
    }
  } catch (...) {
    release();
    throw;
  }
  bytes_ = bytes;
}

HostBuffer::HostBuffer(int64_t bytes, int64_t block_bytes, std::vector<HostBlock> blocks) {
  const std::vector<int64_t> layout = block_layout(bytes, block_bytes);
  if (blocks.size() != layout.size()) {
    throw InvalidArgument("a host buffer of " + std::to_string(bytes) + " bytes in blocks of " +
                          std::to_string(block_bytes) + " needs " +
                          std::to_string(layout.size()) + " blocks, got " +
                          std::to_string(blocks.size()));
  }
  for (size_t i = 0; i < layout.size(); ++i) {
    if (blocks[i].data == nullptr || blocks[i].capacity < layout[i]) {
      throw InvalidArgument("host block " + std::to_string(i) + " holds " +
                            std::to_string(blocks[i].capacity) + " bytes, needs " +
                            std::to_string(layout[i]));
    }
  }
  blocks_ = std::move(blocks);
  bytes_ = bytes < 0 ? 0 : bytes;
  block_bytes_ = block_bytes >= bytes ? 0 : block_bytes;
}

bool HostBuffer::pin_block(size_t i) { return pin_host_block(blocks_.at(i)); }

bool HostBuffer::pinned() const {
  return !blocks_.empty() && std::all_of(blocks_.begin(), blocks_.end(),
                                         [](const HostBlock& b) { return b.pinned(); });
}

std::vector<HostBlock> HostBuffer::release_blocks() noexcept {
  std::vector<HostBlock> blocks = std::move(blocks_);
  blocks_.clear();
  bytes_ = block_bytes_ = 0;
  return blocks;
}

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : blocks_(std::move(other.blocks_)), bytes_(other.bytes_), block_bytes_(other.block_bytes_) {
  other.blocks_.clear();
  other.bytes_ = other.block_bytes_ = 0;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    release();
    blocks_ = std::move(other.blocks_);
    bytes_ = other.bytes_;
    block_bytes_ = other.block_bytes_;
    other.blocks_.clear();
    other.bytes_ = other.block_bytes_ = 0;
  }
  return *this;
}

void HostBuffer::release() noexcept {
  for (const HostBlock& block : blocks_) free_host_block(block);
  blocks_.clear();
  bytes_ = block_bytes_ = 0;
}

}  // namespace moelora
