// The disk -> host read path: every view shape (row runs, column walks with interleaved or
// stacked gate/up, per-expert 3-D tensors, negative strides) from f32/bf16/f16 sources into
// f32/bf16/f16 host copies, at unaligned file offsets, cut into chunks of 4 KiB and 1 MiB and
// read by several threads, against an independent reference; the read plan's invariants; page
// bytes outside rows zero even in a recycled buffer; and faults in the middle of a parallel read
// (truncation, a failed read, a rewrite, a directory replaced by a file, unregistering, the
// cache going away), each confined to its adapter with every page account exact afterwards; and
// how many freed host buffers the cache keeps for later loads. Sites fed by one saved A keep one
// copy of its rows.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "adapter_cache_internal.h"
#include "host_block_pool.h"
#include "moelora/error.h"
#include "moelora/runtime.h"
#include "test_adapter_cache_util.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

namespace {

constexpr int64_t kPageBytes = 512;

struct Cache {
  explicit Cache(DType dtype = DType::kBFloat16, int64_t chunk = 4096, int32_t max_loras = 4,
                 int64_t host_block = int64_t{8} << 20)
      : pool(make_host_arena(kPageBytes * 2048), kPageBytes), copies(make_cpu_copy_engine()) {
    AdapterCacheConfig config;
    config.sites = awkward_sites();
    config.max_loras = max_loras;
    config.max_lora_rank = 8;
    config.max_cpu_loras = 4;
    config.dtype = dtype;
    config.host_threads = 2;
    config.pack_threads = 3;
    config.read_chunk_bytes = chunk;
    config.host_block_bytes = host_block;
    cache = std::make_unique<AdapterCache>(pool, *copies, config);
  }
  ~Cache() { cache.reset(); }
  LoraSiteView view(int site, int layer) const { return cache->site_view(site, layer); }

  PagePool pool;
  std::unique_ptr<CopyEngine> copies;
  std::unique_ptr<AdapterCache> cache;
};

int64_t mismatches(const Cache& c, const AwkwardAdapter& a, int32_t slot, DType dtype) {
  return awkward_mismatches([&](int s, int l) { return c.view(s, l); }, a, slot, dtype);
}

// Bytes of row padding (between a row's last element and its 16-byte-aligned end, which vector
// loads read) in the adapter's device rows that are not zero.
int64_t dirty_padding_bytes(const Cache& c, const AwkwardAdapter& a, int32_t slot, DType dtype) {
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  int64_t dirty = 0;
  for (const LoraMatrixSource& m : a.spec.matrices) {
    const int64_t data = m.cols * elem, padded = lora_row_bytes(m.cols, dtype);
    for (int i = 0; i < m.rows; ++i) {
      const std::byte* row = c.view(m.site, m.layer).row(slot, m.expert, m.is_b, i);
      for (int64_t b = data; b < padded; ++b) dirty += row[b] != std::byte{0};
    }
  }
  return dirty;
}

bool contains(const std::string& text, const std::string& needle) {
  if (text.find(needle) != std::string::npos) return true;
  std::fprintf(stderr, "  message '%s' lacks '%s'\n", text.c_str(), needle.c_str());
  return false;
}

// The pool holds exactly the resident adapters' pages, nothing pinned, its bookkeeping intact.
void check_accounts(const Cache& c, const std::vector<int64_t>& resident) {
  int64_t pages = 0;
  for (int64_t id : resident) pages += c.cache->num_pages(id);
  const PoolStats st = c.pool.stats();
  CHECK_EQ(st.adapter_pages, pages);
  CHECK_EQ(st.adapter_owners, static_cast<int64_t>(resident.size()));
  CHECK_EQ(st.pinned_adapter_pages, int64_t{0});
  CHECK_EQ(st.kv_pages, int64_t{0});
  c.pool.check_invariants();
}

// A fresh directory (temp paths repeat when process ids do).
std::string make_dir(const std::string& stem) {
  const std::string dir = temp_path(stem);
  for (const std::string& d : {dir, dir + ".old"}) {
    ::unlink((d + "/adapter_model.safetensors").c_str());
    ::rmdir(d.c_str());
    ::unlink(d.c_str());
  }
  CHECK(::mkdir(dir.c_str(), 0755) == 0);
  return dir;
}

}  // namespace

TEST_CASE("every view shape converts exactly: dtypes, chunk sizes, threads, unaligned tensors") {
  for (const char* src : {"F32", "BF16", "F16"}) {
    for (DType model : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
      for (int64_t chunk : {int64_t{4096}, int64_t{1} << 20}) {
        // Host copies in one block, and in blocks of 3 pages (rows never straddle a block).
        Cache c(model, chunk, 4, chunk == 4096 ? 3 * kPageBytes : 0);
        AwkwardOptions o;
        o.src_dtype = src;
        o.interleaved_gate_up = chunk == 4096;
        const AwkwardAdapter a = write_awkward_adapter("shapes", temp_path("shapes.st"), o);
        const int64_t id = c.cache->register_adapter(a.spec);
        const int32_t slot = c.cache->wait(id);
        const int64_t bad = mismatches(c, a, slot, model);
        if (bad != 0) {
          std::fprintf(stderr, "  %s -> %s, chunk %lld: %lld elements differ\n", src,
                       dtype_name(model), static_cast<long long>(chunk),
                       static_cast<long long>(bad));
        }
        CHECK_EQ(bad, int64_t{0});
        CHECK_EQ(dirty_padding_bytes(c, a, slot, model), int64_t{0});
        check_accounts(c, {id});
        // experts.gate and experts.up read one saved A: its rows are kept once.
        const AdapterRowLayout unshared(awkward_sites(), a.spec.ranks, model, kPageBytes, 8);
        CHECK(c.cache->num_pages(id) < unshared.num_pages());
        CHECK(c.view(2, 0).row(slot, 1, false, 0) == c.view(1, 0).row(slot, 1, false, 0));
      }
    }
  }
}

TEST_CASE("a recycled host buffer leaves no stale bytes in row padding") {
  Cache c(DType::kFloat32, 4096, 1);
  AwkwardOptions first;
  first.ranks = {7, 4};
  first.src_dtype = "F32";
  const AwkwardAdapter a = write_awkward_adapter("first", temp_path("first.st"), first);
  AwkwardOptions second;
  second.ranks = {4, 7};  // same size, rows elsewhere
  const AwkwardAdapter b = write_awkward_adapter("second", temp_path("second.st"), second);
  const int64_t ida = c.cache->register_adapter(a.spec);
  c.cache->wait(ida);
  c.cache->unregister(ida);  // its host copy's blocks go back to the pool
  CHECK(c.cache->stats().host_blocks_kept >= 1);
  // Stale bytes in every free page, so a page copied without its padding would show them.
  std::memset(c.pool.arena().base(), 0xAB, static_cast<size_t>(kPageBytes * 2048));
  const int64_t idb = c.cache->register_adapter(b.spec);
  const int32_t slot = c.cache->wait(idb);
  CHECK_EQ(mismatches(c, b, slot, DType::kFloat32), int64_t{0});
  CHECK_EQ(dirty_padding_bytes(c, b, slot, DType::kFloat32), int64_t{0});
  check_accounts(c, {idb});
}

TEST_CASE("a host buffer in blocks: every byte addressable, blocks reused only alike") {
  HostBuffer buffer(10 * 1000 + 7, false, 1000);
  CHECK_EQ(buffer.block_bytes(), int64_t{1000});
  for (int64_t i = 0; i < buffer.bytes(); ++i) *buffer.at(i) = std::byte(i % 251);
  for (int64_t i = 0; i < buffer.bytes(); ++i) CHECK(*buffer.at(i) == std::byte(i % 251));
  CHECK(buffer.at(998) + 1 == buffer.at(999));  // within a block: contiguous
  CHECK(buffer.at(999) + 1 != buffer.at(1000));  // blocks never touch: no copy spans two
  CHECK_EQ(HostBuffer(500, false, 1000).block_bytes(), int64_t{0});  // one block
  HostBuffer moved = std::move(buffer);
  CHECK(*moved.at(10006) == std::byte(10006 % 251));
  CHECK_THROWS_AS(HostBuffer(10, false, -1), InvalidArgument);
  HostBuffer later(3000, true, 1000, true);  // ordinary blocks, page-locked one by one later
  CHECK_EQ(later.num_blocks(), size_t{3});
  CHECK(!later.pinned() && !later.block_pinned(0));
  for (size_t b = 0; b < later.num_blocks(); ++b) CHECK_EQ(later.pin_block(b), later.block_pinned(b));
}

TEST_CASE("a host buffer adopts blocks at least as large as its layout") {
  const std::vector<int64_t> layout = HostBuffer::block_layout(2500, 1000);
  CHECK_EQ(layout.size(), size_t{3});
  CHECK(layout[0] > 1000);  // blocks never touch
  CHECK(layout[2] < layout[0]);
  CHECK(HostBuffer::block_layout(500, 1000) == std::vector<int64_t>{500});
  CHECK(HostBuffer::block_layout(500, 0) == std::vector<int64_t>{500});
  std::vector<HostBlock> blocks;
  for (int i = 0; i < 3; ++i) blocks.push_back(allocate_host_block(layout[0], false));
  HostBuffer adopted(2500, 1000, blocks);  // the last block larger than needed
  for (int64_t i = 0; i < adopted.bytes(); ++i) *adopted.at(i) = std::byte(i % 13);
  for (int64_t i = 0; i < adopted.bytes(); ++i) CHECK(*adopted.at(i) == std::byte(i % 13));
  std::vector<HostBlock> too_few(blocks.begin(), blocks.begin() + 2);
  CHECK_THROWS_AS(HostBuffer(2500, 1000, too_few), InvalidArgument);
  std::vector<HostBlock> back = adopted.release_blocks();
  CHECK_EQ(back.size(), size_t{3});
  CHECK_EQ(adopted.bytes(), int64_t{0});
  std::vector<HostBlock> small = {allocate_host_block(100, false)};
  CHECK_THROWS_AS(HostBuffer(500, 0, small), InvalidArgument);  // the caller keeps it
  for (const HostBlock& b : back) free_host_block(b);
  free_host_block(small[0]);
}

TEST_CASE("the host block pool reuses blocks across copies of any size") {
  auto pool = std::make_shared<detail::HostBlockPool>();
  const int64_t block = 1 << 16;
  { auto a = pool->take(10 * block + 5, block); }  // 11 blocks come back
  CHECK_EQ(pool->kept_blocks(), int64_t{11});
  CHECK_EQ(pool->buffers_in_use(), int64_t{0});
  {
    auto b = pool->take(4 * block, block);  // another size: four full blocks reused
    CHECK_EQ(b->num_blocks(), size_t{4});
    CHECK_EQ(pool->kept_blocks(), int64_t{7});
    auto c = pool->take(6 * block, block);  // six of the rest (the short tail never fits)
    CHECK_EQ(pool->kept_blocks(), int64_t{1});
    CHECK_EQ(pool->bytes_in_use(), int64_t{10} * (block + 4096));
  }
  CHECK_EQ(pool->kept_blocks(), int64_t{11});
  CHECK_EQ(pool->bytes_in_use(), int64_t{0});
}

TEST_CASE("the host block pool keeps no more than the peak in use, and frees unusable blocks") {
  auto pool = std::make_shared<detail::HostBlockPool>();
  const int64_t block = 1 << 16;
  { auto a = pool->take(3 * block, block); }
  const int64_t peak = pool->kept_bytes();
  {
    // A one-block copy of another size fits no kept block: kept ones are freed so that kept
    // plus in use stays within the peak.
    auto big = pool->take(2 * peak);
    CHECK_EQ(pool->kept_blocks(), int64_t{0});
  }
  CHECK_EQ(pool->kept_blocks(), int64_t{1});  // the peak is now the big copy
  CHECK(pool->kept_bytes() <= 2 * peak);
  pool->clear();
  CHECK_EQ(pool->kept_bytes(), int64_t{0});
}

TEST_CASE("the host block pool makes its reserve ahead and again as loads take it") {
  CHECK_THROWS_AS(detail::HostBlockPool(1 << 20, 0), InvalidArgument);
  CHECK_THROWS_AS(detail::HostBlockPool(-1, 4096), InvalidArgument);
  const int64_t block = 1 << 16;
  auto pool = std::make_shared<detail::HostBlockPool>(3 * block, block);
  int made = 0;
  while (pool->wants_reserve_block()) {
    pool->make_reserve_block();
    ++made;
  }
  CHECK_EQ(made, 3);
  CHECK_EQ(pool->reserve_blocks_made(), int64_t{3});
  {
    auto a = pool->take(2 * block, block);  // two reserve blocks
    CHECK_EQ(pool->kept_blocks(), int64_t{1});
    CHECK(pool->wants_reserve_block());
    while (pool->wants_reserve_block()) pool->make_reserve_block();
    CHECK_EQ(pool->kept_blocks(), int64_t{3});
  }
  // Its blocks come back, but kept plus in use stays within the larger of the peak in use
  // (two blocks) and in use plus the reserve (three).
  CHECK_EQ(pool->kept_blocks(), int64_t{3});
  CHECK(!pool->wants_reserve_block());
}

TEST_CASE("threads making the host reserve together make exactly the reserve") {
  const int64_t block = 1 << 16;
  const int64_t capacity = HostBuffer::block_layout(block + 1, block).front();  // with slack
  auto pool = std::make_shared<detail::HostBlockPool>(37 * capacity, block);
  std::vector<std::thread> makers;
  for (int t = 0; t < 4; ++t) {
    makers.emplace_back([&pool] {
      while (pool->wants_reserve_block()) {
        pool->make_reserve_block(std::chrono::microseconds{50});
      }
    });
  }
  for (auto& m : makers) m.join();
  CHECK_EQ(pool->reserve_blocks_made(), int64_t{37});
  CHECK_EQ(pool->kept_blocks(), int64_t{37});
  CHECK(!pool->wants_reserve_block());
}

TEST_CASE("a host block pool frees its kept blocks and reserve when it goes") {
  const int64_t before = host_block_bytes_allocated();
  const int64_t block = 1 << 16;
  std::shared_ptr<HostBuffer> outlives;
  {
    auto pool = std::make_shared<detail::HostBlockPool>(3 * block, block);
    while (pool->wants_reserve_block()) pool->make_reserve_block();
    { auto a = pool->take(5 * block, block); }  // two reserve blocks reused, three new
    outlives = pool->take(2 * block, block);
    CHECK(host_block_bytes_allocated() > before);
  }
  CHECK(host_block_bytes_allocated() > before);  // the buffer still out holds its blocks
  outlives.reset();
  CHECK_EQ(host_block_bytes_allocated(), before);
}

TEST_CASE("read plan: chunks cover each tensor's needed elements once, in order, in bounds") {
  AwkwardOptions o;
  o.src_dtype = "F32";
  const AwkwardAdapter a = write_awkward_adapter("plan", temp_path("plan.st"), o);
  AdapterCacheConfig config;
  config.sites = awkward_sites();
  config.max_lora_rank = 8;
  config.dtype = DType::kBFloat16;
  auto entry = detail::validate_adapter_spec(a.spec, config, kPageBytes);
  for (int64_t chunk_bytes : {int64_t{4096}, int64_t{8192}, int64_t{1} << 20}) {
    const detail::ReadPlan plan = detail::build_read_plan(*entry, DType::kBFloat16, chunk_bytes);
    std::vector<int64_t> next(plan.groups.size());
    for (size_t g = 0; g < plan.groups.size(); ++g) next[g] = plan.groups[g].first_elem;
    int64_t previous_end = 0, largest_row = 0;
    for (const auto& g : plan.groups) largest_row = std::max(largest_row, g.row_elems * 4);
    for (const detail::ReadChunk& chunk : plan.chunks) {
      CHECK(chunk.bytes > 0);
      CHECK(chunk.offset >= previous_end);  // one file: chunks in order, never overlapping
      CHECK(chunk.bytes <= chunk_bytes + largest_row);
      previous_end = chunk.offset + chunk.bytes;
      for (const detail::ChunkPiece& piece : chunk.pieces) {
        const detail::TensorGroup& g = plan.groups[piece.group];
        CHECK_EQ(piece.first_elem, next[piece.group]);
        CHECK(piece.end_elem > piece.first_elem);
        CHECK_EQ(chunk.offset + piece.staging_offset,
                 g.info.data_offset + piece.first_elem * g.elem_bytes);
        CHECK(piece.staging_offset + (piece.end_elem - piece.first_elem) * g.elem_bytes <=
              chunk.bytes);
        if (g.walks_columns) {  // whole rows, so that a piece can be transposed
          CHECK_EQ(piece.first_elem % g.row_elems, int64_t{0});
          CHECK_EQ(piece.end_elem % g.row_elems, int64_t{0});
        }
        next[piece.group] = piece.end_elem;
      }
    }
    for (size_t g = 0; g < plan.groups.size(); ++g) CHECK_EQ(next[g], plan.groups[g].end_elem);
    // Which views are transposed: the B tensors read down their columns.
    std::set<std::string> columns;
    for (const auto& g : plan.groups) {
      if (g.walks_columns) columns.insert(g.info.name);
    }
    CHECK(columns == (std::set<std::string>{"layers.0.q.B", "layers.0.gate_up.B",
                                            "layers.0.down.B", "layers.1.q.B",
                                            "layers.1.gate_up.B", "layers.1.down.B"}));
    // Row padding: every row whose length is not a multiple of 16 bytes, nothing else.
    int64_t padding = 0, expected = 0;
    for (const auto& pad : plan.row_padding) {
      CHECK(pad.bytes > 0 && pad.bytes < 16);
      CHECK((pad.offset + pad.bytes) % 16 == 0);
      padding += pad.bytes;
    }
    for (const auto& m : a.spec.matrices) {
      expected += m.rows * (lora_row_bytes(m.cols, DType::kBFloat16) - m.cols * 2);
    }
    CHECK_EQ(padding, expected);
    CHECK(expected > 0);
  }
}

TEST_CASE("a file truncated in the middle of a parallel read fails its adapter alone") {
  Cache c;
  const AwkwardAdapter victim = write_awkward_adapter("trunc", temp_path("trunc.st"), {});
  const AwkwardAdapter other = write_awkward_adapter("other", temp_path("other.st"), {});
  const int64_t idv = c.cache->register_adapter(victim.spec);
  const int64_t ido = c.cache->register_adapter(other.spec);
  detail::set_read_hook(*c.cache, [&](const std::string& adapter, int32_t, int64_t chunk) {
    if (adapter == "trunc" && chunk == 2) {
      CHECK(::truncate(victim.spec.files[0].c_str(), 5000) == 0);
    }
  });
  c.cache->prefetch(idv);
  c.cache->prefetch(ido);
  CHECK_THROWS_AS(c.cache->wait(idv), AdapterError);
  const std::string message = c.cache->error_message(idv);
  CHECK(contains(message, "adapter 'trunc'"));
  CHECK(contains(message, "'" + detail::base_name(victim.spec.files[0]) + "'"));
  CHECK(contains(message, "truncated"));
  CHECK(message.find("/tmp") == std::string::npos);
  const int32_t slot = c.cache->wait(ido);
  CHECK_EQ(mismatches(c, other, slot, DType::kBFloat16), int64_t{0});
  detail::set_read_hook(*c.cache, nullptr);
  const AdapterCacheStats st = c.cache->stats();
  CHECK_EQ(st.failed, int64_t{1});
  CHECK_EQ(st.host_loads_failed, int64_t{1});
  CHECK_EQ(st.host_copies, int64_t{1});
  CHECK_EQ(st.host_buffers_in_use, int64_t{1});  // the failed load's buffer came back
  check_accounts(c, {ido});
}

TEST_CASE("a failed read cancels the load's other chunks and names the adapter and file") {
  Cache c;
  AwkwardOptions big;
  big.src_dtype = "F32";
  big.ranks = {8, 8};
  const AwkwardAdapter a = write_awkward_adapter("broken", temp_path("broken.st"), big);
  const int64_t id = c.cache->register_adapter(a.spec);
  AdapterCacheConfig config;
  config.sites = awkward_sites();
  config.max_lora_rank = 8;
  config.dtype = DType::kBFloat16;
  const size_t chunks =
      detail::build_read_plan(*detail::validate_adapter_spec(a.spec, config, kPageBytes),
                              DType::kBFloat16, 4096)
          .chunks.size();
  CHECK(chunks > 6);  // more than the cache's 6 reader threads
  std::atomic<int> calls{0};
  detail::set_read_hook(*c.cache, [&](const std::string&, int32_t, int64_t chunk) {
    ++calls;
    if (chunk == 0) throw IoError("injected read failure");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the failure lands first
  });
  CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
  CHECK(contains(c.cache->error_message(id), "adapter 'broken': injected read failure"));
  // Chunks after the failure are skipped, not read: at most one per reader thread was claimed.
  CHECK(calls.load() <= 6);
  detail::set_read_hook(*c.cache, nullptr);
  CHECK_EQ(c.cache->stats().host_buffers_in_use, int64_t{0});
  check_accounts(c, {});
  // Reloaded (registered again), the adapter works.
  c.cache->unregister(id);
  const int64_t again = c.cache->register_adapter(a.spec);
  CHECK_EQ(mismatches(c, a, c.cache->wait(again), DType::kBFloat16), int64_t{0});
  check_accounts(c, {again});
  std::printf("  (%zu chunks)\n", chunks);
}

TEST_CASE("a file rewritten during the read fails the load; one renamed over it does not") {
  Cache c;
  const std::string path = temp_path("rewrite.st");
  const AwkwardAdapter a = write_awkward_adapter("rewrite", path, {});
  const int64_t id = c.cache->register_adapter(a.spec);
  detail::set_read_hook(*c.cache, [&](const std::string& adapter, int32_t, int64_t chunk) {
    if (adapter == "rewrite" && chunk == 1) {
      AwkwardOptions o;
      o.scale = 0.5f;
      write_awkward_adapter("rewrite", path, o);  // same size, in place
      const struct timespec later[2] = {{0, UTIME_OMIT}, {2000000000, 0}};
      ::utimensat(AT_FDCWD, path.c_str(), later, 0);  // a clock coarser than the test
    }
  });
  CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
  // Rewritten in place, the file is seen shorter mid-way or changed at the end.
  CHECK(contains(c.cache->error_message(id), "while it was read; reload the adapter") ||
        contains(c.cache->error_message(id), "truncated while it was read"));

  // A new file renamed over the old one: the open file still reads the registered bytes.
  const std::string renamed = temp_path("renamed.st");
  const AwkwardAdapter b = write_awkward_adapter("renamed", renamed, {});
  const int64_t idb = c.cache->register_adapter(b.spec);
  detail::set_read_hook(*c.cache, [&](const std::string& adapter, int32_t, int64_t chunk) {
    if (adapter == "renamed" && chunk == 1) {
      const std::string replacement = temp_path("replacement.st");
      AwkwardOptions o;
      o.scale = 0.5f;
      write_awkward_adapter("renamed", replacement, o);
      CHECK(::rename(replacement.c_str(), renamed.c_str()) == 0);
    }
  });
  CHECK_EQ(mismatches(c, b, c.cache->wait(idb), DType::kBFloat16), int64_t{0});
  detail::set_read_hook(*c.cache, nullptr);
  check_accounts(c, {idb});
  // The next load of it sees the replaced file.
  c.cache->unregister(idb);
  check_accounts(c, {});
}

TEST_CASE("an adapter directory replaced by a file fails the load naming only the file") {
  Cache c;
  const std::string dir = make_dir("adapter_dir");
  const std::string path = dir + "/adapter_model.safetensors";
  const AwkwardAdapter a = write_awkward_adapter("dir_gone", path, {});
  const int64_t id = c.cache->register_adapter(a.spec);
  const AwkwardAdapter ok = write_awkward_adapter("dir_ok", temp_path("dir_ok.st"), {});
  const int64_t idok = c.cache->register_adapter(ok.spec);
  CHECK(::rename(dir.c_str(), (dir + ".old").c_str()) == 0);
  write_raw_file(dir, "not a directory", {});
  c.cache->prefetch(id);
  c.cache->prefetch(idok);
  CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
  const std::string message = c.cache->error_message(id);
  CHECK(contains(message, "adapter 'dir_gone': file 'adapter_model.safetensors' is gone"));
  CHECK(message.find(dir) == std::string::npos);
  CHECK_EQ(mismatches(c, ok, c.cache->wait(idok), DType::kBFloat16), int64_t{0});
  check_accounts(c, {idok});
  ::unlink(dir.c_str());
  ::unlink((dir + ".old/adapter_model.safetensors").c_str());
  ::rmdir((dir + ".old").c_str());
}

TEST_CASE("unregistering during a parallel read drops it; the cache keeps serving") {
  Cache c;
  const AwkwardAdapter a = write_awkward_adapter("dropped", temp_path("dropped.st"), {});
  const AwkwardAdapter b = write_awkward_adapter("kept", temp_path("kept.st"), {});
  const int64_t id = c.cache->register_adapter(a.spec);
  std::mutex mutex;
  std::condition_variable cv;
  bool reading = false, unregistered = false;
  detail::set_read_hook(*c.cache, [&](const std::string& adapter, int32_t, int64_t chunk) {
    if (adapter != "dropped" || chunk != 2) return;
    std::unique_lock<std::mutex> lock(mutex);
    reading = true;
    cv.notify_all();
    cv.wait(lock, [&] { return unregistered; });
  });
  c.cache->prefetch(id);
  {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return reading; });
  }
  c.cache->unregister(id);
  {
    std::lock_guard<std::mutex> lock(mutex);
    unregistered = true;
  }
  cv.notify_all();
  CHECK_THROWS_AS(c.cache->wait(id), NotFound);
  const int64_t idb = c.cache->register_adapter(b.spec);
  CHECK_EQ(mismatches(c, b, c.cache->wait(idb), DType::kBFloat16), int64_t{0});
  detail::set_read_hook(*c.cache, nullptr);
  CHECK_EQ(c.cache->stats().host_copies, int64_t{1});
  // The dropped load's buffer comes back once its last claimed chunk is done.
  CHECK(eventually([&] { return c.cache->stats().host_buffers_in_use == 1; }));
  check_accounts(c, {idb});
}

TEST_CASE("the cache goes away in the middle of a read: no hang, nothing left in the pool") {
  auto c = std::make_unique<Cache>();
  const AwkwardAdapter a = write_awkward_adapter("midway", temp_path("midway.st"), {});
  const int64_t id = c->cache->register_adapter(a.spec);
  std::atomic<bool> started{false};
  detail::set_read_hook(*c->cache, [&](const std::string&, int32_t, int64_t) {
    started = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  });
  c->cache->prefetch(id);
  while (!started) std::this_thread::yield();
  c->cache.reset();
  CHECK_EQ(c->pool.stats().adapter_pages, int64_t{0});
  CHECK_EQ(c->pool.stats().adapter_owners, int64_t{0});
  c->pool.check_invariants();
}

TEST_CASE("cuda: every view shape through page-locked host copies and the CUDA copy engine") {
  if (!cuda_available()) {
    std::printf("  (no GPU: skipped)\n");
    return;
  }
  auto copies = make_cuda_copy_engine(0, 2);
  PagePool pool(make_cuda_arena(kPageBytes * 2048, 0), kPageBytes);
  AdapterCacheConfig config;
  config.sites = awkward_sites();
  config.max_loras = 2;
  config.max_lora_rank = 8;
  config.dtype = DType::kBFloat16;
  config.host_threads = 2;
  config.pack_threads = 3;
  config.read_chunk_bytes = 4096;
  AdapterCache cache(pool, *copies, config);
  std::vector<AwkwardAdapter> adapters;
  for (const char* src : {"F32", "BF16", "F16"}) {
    AwkwardOptions o;
    o.src_dtype = src;
    adapters.push_back(write_awkward_adapter(std::string("gpu_") + src,
                                             temp_path(std::string("gpu_") + src + ".st"), o));
  }
  for (const AwkwardAdapter& a : adapters) {
    const int64_t id = cache.register_adapter(a.spec);
    const int32_t slot = cache.wait(id);
    cache.acquire(id);
    // The arena and the row tables back on the host; rows are read there.
    HostBuffer arena(pool.arena().bytes(), false);
    copies->wait(copies->submit({{arena.data(), pool.arena().base(), arena.bytes()}}));
    std::vector<std::vector<int64_t>> rows_back;
    std::vector<std::vector<int32_t>> ranks_back;
    auto view_of = [&](int site, int layer) {
      LoraSiteView device_view = cache.site_view(site, layer);
      rows_back.emplace_back(device_view.slot_stride * config.max_loras);
      ranks_back.emplace_back(device_view.rank_slot_stride * config.max_loras);
      const int64_t rows = device_view.slot_stride * (config.max_loras - 1) +
                           device_view.num_experts * 2 * device_view.max_rank;
      const int64_t ranks = device_view.rank_slot_stride * (config.max_loras - 1) + 1;
      copies->wait(copies->submit({{rows_back.back().data(), device_view.row_offsets, rows * 8},
                                   {ranks_back.back().data(), device_view.ranks, ranks * 4}}));
      LoraSiteView host_view = device_view;
      host_view.arena = arena.data();
      host_view.row_offsets = rows_back.back().data();
      host_view.ranks = ranks_back.back().data();
      return host_view;
    };
    CHECK_EQ(awkward_mismatches(view_of, a, slot, DType::kBFloat16), int64_t{0});
    cache.release(id);
  }
  CHECK(cache.stats().device_evictions >= 1);
  CHECK_EQ(pool.stats().pinned_adapter_pages, int64_t{0});
  pool.check_invariants();
}

MOELORA_TEST_MAIN()
