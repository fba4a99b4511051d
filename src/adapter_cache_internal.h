// Internal state of the AdapterCache, shared by adapter_cache.cpp (tiers and state machine)
// and adapter_cache_load.cpp (spec validation and host packing).
#pragma once

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

#include "moelora/adapter_cache.h"
#include "moelora/safetensors.h"

namespace moelora::detail {

enum class HostState : uint8_t { kNone, kQueued, kReady, kFailed };
// kWaiting: wants the device, no slot/pages yet. kAllocating: slot reserved, pages being
// allocated without the cache's mutex held. kCopying: pages pinned, copy ticket in flight.
enum class DeviceState : uint8_t { kNone, kWaiting, kAllocating, kCopying, kResident };

// A file as it was when the adapter was registered: a load compares it with the file it finds.
struct FileStamp {
  int64_t size = 0;
  int64_t mtime_ns = 0;
  uint64_t inode = 0;
};

struct AdapterEntry {
  int64_t id = 0;
  std::string name;
  AdapterSpec spec;
  std::vector<SafetensorsFile> files;
  std::vector<FileStamp> file_stamps;  // per file, at registration
  std::vector<SafetensorInfo> matrix_tensors;  // per spec.matrices entry
  std::unique_ptr<AdapterRowLayout> layout;

  HostState host_state = HostState::kNone;
  std::shared_ptr<HostBuffer> host;
  uint64_t host_lru = 0;

  DeviceState device_state = DeviceState::kNone;
  bool want_device = false;
  int32_t slot = -1;
  std::vector<PageId> pages;
  CopyTicket ticket = kNoCopyTicket;
  int32_t acquire_pins = 0;
  uint64_t device_lru = 0;
  std::chrono::steady_clock::time_point load_start;

  bool cancelled = false;  // unregistered; background work drops its result
  bool failed = false;
  std::string error;
};

// Validates `spec` (files, tensors, dtypes, views, ranks, coverage) and returns an entry with its
// files' headers and row layout; throws AdapterError naming the adapter.
std::shared_ptr<AdapterEntry> validate_adapter_spec(const AdapterSpec& spec,
                                                    const AdapterCacheConfig& config,
                                                    int64_t page_bytes);

// Reads, converts to `dtype`, scales and packs the adapter's rows into a page-ordered buffer
// (tails zeroed). Throws AdapterError when a file is gone, changed since registration or
// unreadable, or when a weight is NaN or Inf (or overflows `dtype`), naming the tensor.
HostBuffer pack_adapter_rows(const AdapterEntry& entry, DType dtype, int threads);

// The file name of a path (what follows the last '/').
std::string base_name(const std::string& path);
// `message` with every path in `files` that names a directory cut to its file name.
std::string cut_directories(std::string message, const std::vector<std::string>& files);
// The message of a failure of adapter `adapter` for its users: "adapter 'NAME': problem", with
// the prefix given once and every path in `files` cut to its file name, so a message that
// reaches a client shows no directory of the server.
std::string failure_message(const std::string& adapter, const std::string& what,
                            const std::vector<std::string>& files);

}  // namespace moelora::detail
