// The CPU copy engine (a worker thread over a FIFO queue) and HostBuffer.
#include "moelora/copy_engine.h"

#include <condition_variable>
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
    std::lock_guard<std::mutex> lock(mutex_);
    return ticket <= last_completed_;
  }

  void wait(CopyTicket ticket) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (ticket > last_submitted_) {
      throw InvalidArgument("copy ticket " + std::to_string(ticket) + " was never submitted");
    }
    work_done_.wait(lock, [&] { return ticket <= last_completed_; });
  }

  void make_stream_wait(CopyTicket ticket, void* cuda_stream) override { wait(ticket); }

  void synchronize() override {
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
      for (const CopyRegion& r : job.regions) {
        if (r.bytes > 0) std::memcpy(r.dst, r.src, static_cast<size_t>(r.bytes));
      }
      lock.lock();
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
  bool stopping_ = false;
  std::thread worker_;  // last: started after every other member exists
};

constexpr size_t kHostAlignment = 4096;

}  // namespace

std::unique_ptr<CopyEngine> make_cpu_copy_engine() { return std::make_unique<CpuCopyEngine>(); }

HostBuffer::HostBuffer(int64_t bytes, bool try_pinned) {
  if (bytes < 0) throw InvalidArgument("HostBuffer bytes must be >= 0, got " + std::to_string(bytes));
  if (bytes == 0) return;
  if (try_pinned) {
    data_ = static_cast<std::byte*>(detail::try_pinned_host_alloc(bytes));
    pinned_ = data_ != nullptr;
  }
  if (data_ == nullptr) {
    size_t rounded = (static_cast<size_t>(bytes) + kHostAlignment - 1) / kHostAlignment *
                     kHostAlignment;
    data_ = static_cast<std::byte*>(std::aligned_alloc(kHostAlignment, rounded));
    if (data_ == nullptr) {
      throw InvalidArgument("cannot allocate a host buffer of " + std::to_string(bytes) +
                            " bytes");
    }
  }
  bytes_ = bytes;
}

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : data_(other.data_), bytes_(other.bytes_), pinned_(other.pinned_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
  other.pinned_ = false;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    bytes_ = other.bytes_;
    pinned_ = other.pinned_;
    other.data_ = nullptr;
    other.bytes_ = 0;
    other.pinned_ = false;
  }
  return *this;
}

void HostBuffer::release() noexcept {
  if (data_ == nullptr) return;
  if (pinned_) {
    detail::pinned_host_free(data_);
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  bytes_ = 0;
  pinned_ = false;
}

}  // namespace moelora
