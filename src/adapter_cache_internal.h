// Internal types of the AdapterCache shared by its implementation files:
//   adapter_cache_load.cpp   spec validation at registration, failure messages;
//   adapter_cache_plan.cpp   the read plan of a load (chunks of file bytes, what each holds);
//   adapter_cache_convert.cpp  the fused conversion of a chunk into the host copy's rows;
//   adapter_cache_read.cpp   reading one chunk, file checks;
//   adapter_cache_host.cpp   the host tier (reader threads, jobs, host LRU);
//   adapter_cache_device.cpp starting device loads (the starter thread);
//   adapter_cache.cpp        the device tier and the public API.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "moelora/adapter_cache.h"
#include "moelora/safetensors.h"

namespace moelora::detail {

enum class HostState : uint8_t { kNone, kQueued, kReady, kFailed };
// kWaiting: wants the device, no slot/pages yet. kAllocating: slot reserved, pages being
// allocated without the cache's mutex held. kCopying: pages pinned, copy ticket in flight.
enum class DeviceState : uint8_t { kNone, kWaiting, kAllocating, kCopying, kResident };

// Queue position of an adapter no queued request waits for (sorts after every real position).
constexpr int64_t kNoDemand = std::numeric_limits<int64_t>::max();

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
  std::unique_ptr<AdapterRowLayout> layout;

  HostState host_state = HostState::kNone;
  std::shared_ptr<HostBuffer> host;  // layout->num_pages() pages, in page order
  uint64_t host_lru = 0;
  uint64_t host_queue_order = 0;  // FIFO order among host loads of equal demand

  DeviceState device_state = DeviceState::kNone;
  bool want_device = false;
  bool start_asked = false;  // in the starter's queue
  int32_t slot = -1;
  std::vector<PageId> pages;
  CopyTicket ticket = kNoCopyTicket;
  std::vector<CopyTicket> streamed_tickets;  // block copies queued before `ticket` (kCopying)
  int32_t acquire_pins = 0;
  uint64_t device_lru = 0;
  uint64_t device_generation = 0;  // counts the times its device pages were freed
  uint64_t releases_when_waiting = 0;  // State::device_releases when it last found no room
  std::chrono::steady_clock::time_point load_start;

  // Position of the first queued request that waits for this adapter (set_demand), or kNoDemand.
  int64_t demand = kNoDemand;
  // Requests noted for it (note_request), decayed: worth `popularity` when the cache had seen
  // `popularity_at` requests.
  double popularity = 0.0;
  uint64_t popularity_at = 0;

  bool cancelled = false;  // unregistered; background work drops its result
  bool failed = false;
  std::string error;

  int64_t host_copy_bytes() const { return layout->num_pages() * layout->page_bytes(); }
  // The host copy's blocks (HostBuffer): whole pages, about `target` bytes each (0: one).
  int64_t host_block_bytes(int64_t target) const {
    const int64_t page = layout->page_bytes();
    return target == 0 ? 0 : std::max<int64_t>(1, target / page) * page;
  }
};

// Validates `spec` (files, tensors, dtypes, views, ranks, coverage) and returns an entry with its
// files' headers and row layout, its spec with one source per expert; throws AdapterError
// naming the adapter.
std::shared_ptr<AdapterEntry> validate_adapter_spec(const AdapterSpec& spec,
                                                    const AdapterCacheConfig& config,
                                                    int64_t page_bytes);

// The file name of a path (what follows the last '/').
std::string base_name(const std::string& path);
// `message` with every path in `files` that names a directory cut to its file name.
std::string cut_directories(std::string message, const std::vector<std::string>& files);
// The message of a failure of adapter `adapter` for its users: "adapter 'NAME': problem", with
// the prefix given once and every path in `files` cut to its file name, so a message that
// reaches a client shows no directory of the server.
std::string failure_message(const std::string& adapter, const std::string& what,
                            const std::vector<std::string>& files);
// First and last element a strided [rows, cols] view touches.
std::pair<int64_t, int64_t> view_extent(const LoraMatrixSource& m);
// "matrix (site S, layer L, expert E, A|B)".
std::string matrix_name(const LoraMatrixSource& m);
FileStamp stamp_of_stat(const void* stat_struct);  // a `struct stat*`

// ---- the read plan of one disk -> host load -------------------------------------------------

// One source tensor and the matrix views read from it. Its elements are seen as a 2-D array
// [numel / row_elems, row_elems] (row_elems: the tensor's last dimension).
struct TensorGroup {
  int32_t file = 0;
  SafetensorInfo info;
  int64_t elem_bytes = 0;
  int64_t row_elems = 1;
  std::vector<int32_t> matrices;  // indices into AdapterSpec::matrices
  int64_t first_elem = 0;         // [first_elem, end_elem): the elements the views touch
  int64_t end_elem = 0;           //   (whole rows when walks_columns)
  // Every view walks down columns: element (i, j) is in row first + j * column_step and column
  // c0 + i * row_stride. PEFT's B of fused experts ([out, E*r], B^T rows are columns) and of
  // dense projections ([out, r]). Such pieces are transposed in the cache before conversion.
  bool walks_columns = false;
  int64_t column_step = 1;
};

// The part of one group's elements held by a chunk, at `staging_offset` bytes into the chunk.
struct ChunkPiece {
  int32_t group = 0;
  int64_t first_elem = 0;
  int64_t end_elem = 0;
  int64_t staging_offset = 0;
};

// One pread: `bytes` bytes of file `file` at `offset`.
struct ReadChunk {
  int32_t file = 0;
  int64_t offset = 0;
  int64_t bytes = 0;
  std::vector<ChunkPiece> pieces;
};

struct ByteRange {
  int64_t offset = 0;
  int64_t bytes = 0;
};

struct ReadPlan {
  std::vector<TensorGroup> groups;
  std::vector<ReadChunk> chunks;    // in file order; each file's chunks start chunk-aligned
  std::vector<ByteRange> row_padding;  // zeroed: a row's bytes past its last element
  int64_t largest_chunk = 0;
  int64_t read_bytes = 0;           // summed chunk bytes (the needed bytes and small holes)
};

// The chunks of a load: each file's needed byte spans (holes under 64 KiB read through) cut at
// multiples of `chunk_bytes` moved to a row (or element) boundary of the tensor they fall in.
ReadPlan build_read_plan(const AdapterEntry& entry, DType model_dtype, int64_t chunk_bytes);

// For each chunk of `plan`, the blocks of the host copy (of `block_bytes`; 0: one block) its
// pieces write, ascending: every row of each matrix view a piece overlaps, a superset of what
// it writes, so a block whose chunks are all converted is complete.
std::vector<std::vector<int32_t>> chunk_host_blocks(const AdapterEntry& entry,
                                                    const ReadPlan& plan, DType model_dtype,
                                                    int64_t block_bytes);

// Per-thread buffers of the conversion (grown on demand, reused across chunks and loads).
struct ReaderScratch {
  std::vector<std::byte> staging;     // one chunk as read
  std::vector<std::byte> transposed;  // one walks-columns piece, transposed
};

// Writes every element of `piece` (whose bytes start at `chunk_bytes`) into its rows of `host`:
// source dtype -> model dtype, B's scale folded in, non-finite results refused. Throws
// AdapterError naming the tensor, the matrix, the element and the file.
void convert_piece(const AdapterEntry& entry, const ReadPlan& plan, const ChunkPiece& piece,
                   const std::byte* chunk_bytes, DType model_dtype, const HostBuffer& host,
                   ReaderScratch& scratch);

// Converts n elements of `src` (stride in elements) times `scale` into contiguous `dst`; returns
// the index of the first stored value that is not finite, or -1. An exact copy (same dtype,
// scale 1, stride 1) is written with non-temporal stores where the CPU has them:
// stream_fence() before another thread or a DMA reads `dst`.
int64_t convert_elements(const std::byte* src, DType src_dtype, int64_t stride, int64_t n,
                         float scale, std::byte* dst, DType dst_dtype);
// memcpy with non-temporal stores for the 16-byte-aligned part of `dst`.
void stream_copy(std::byte* dst, const std::byte* src, int64_t bytes);
// Orders this thread's non-temporal stores before its later stores (an x86 sfence).
void stream_fence();

// ---- reading ---------------------------------------------------------------------------------

// The adapter's files opened for one load (closed on destruction).
class OpenFiles {
 public:
  // Opens every file and checks it is the one registered: a file that is gone, shrunk,
  // rewritten or replaced throws AdapterError saying which and what happened.
  explicit OpenFiles(const AdapterEntry& entry);
  ~OpenFiles();
  OpenFiles(const OpenFiles&) = delete;
  OpenFiles& operator=(const OpenFiles&) = delete;
  // Reads one chunk into `dst`; a short or failed read throws AdapterError naming the file.
  void read(const AdapterEntry& entry, const ReadChunk& chunk, std::byte* dst) const;
  // After the last chunk: throws AdapterError if a file changed while it was read.
  void check_unchanged(const AdapterEntry& entry) const;

 private:
  std::vector<int> fds_;
};

// Test hook, called on a reader thread before each chunk is read: (adapter name, file index,
// chunk index). An exception it throws fails the load as a failed read would.
using ReadHook = std::function<void(const std::string&, int32_t, int64_t)>;
void set_read_hook(AdapterCache& cache, ReadHook hook);

// Test hook: true when no read, device load or copy is in progress and none can start until the
// cache is called again (so a test can check that something did not happen without sleeping).
bool is_settled(AdapterCache& cache);

}  // namespace moelora::detail
