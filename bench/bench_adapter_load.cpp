// Adapter loads end to end, each against a plain baseline measured in the same run:
//   plain_read   N threads pread the adapter's file in 4 MiB chunks into one host buffer (the
//                storage's rate; the baseline of host_load);
//   host_load    AdapterCache::load_host: disk -> host copy (read, dtype conversion, scale,
//                NaN/Inf check, page order), on the cache's reader threads;
//   plain_h2d    one copy of a pinned buffer of the host copy's size to the GPU (the baseline of
//                device_load);
//   device_load  prefetch + wait of an adapter whose host copy is ready: host -> device pages
//                through the copy engine, row tables included;
//   register     AdapterCache::register_adapter (headers checked, row layout), against
//                plain_read;
//   disk_to_device  register + prefetch + wait of a cold adapter (both tiers; its copy streams
//                beside the read), against the plain read; also `read_then_copy_ms`: register +
//                load_host + prefetch + wait, the copy after the read (also with --device cpu,
//                where the pool is host memory and a CPU thread copies).
// The adapter is a PEFT-format rank-r adapter on every attention and expert site of the first
// --layers layers of a preset (fused-expert tensors A [E*r, in], B [out, E*r]; GPT-OSS gate/up
// rows interleaved), written once under --dir. --cold drops the files' page cache before every
// timed run (posix_fadvise DONTNEED; no root needed) and reports whether it took effect.
//   bench_adapter_load --preset gpt-oss-20b --layers 4 --rank 16 --src-dtype bf16 --threads 8
//                      [--repeats 5] [--cold] [--device cpu|cuda] [--page-kib 32]
//                      [--chunk-kib 1024] [--dir /tmp/moelora-bench-adapters]
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "half_convert.h"
#include "moelora/adapter_cache.h"
#include "moelora/arena.h"
#include "moelora/copy_engine.h"
#include "moelora/error.h"

using namespace moelora;

namespace {

struct Preset {
  std::string name;
  int64_t hidden, inter, experts, q_out, kv_out;
  bool interleaved_gate_up;
};

Preset preset_named(const std::string& name) {
  if (name == "gpt-oss-20b") return {name, 2880, 2880, 32, 64 * 64, 8 * 64, true};
  if (name == "qwen3-30b-a3b") return {name, 2048, 768, 128, 32 * 128, 4 * 128, false};
  if (name == "mixtral-8x7b") return {name, 4096, 14336, 8, 32 * 128, 8 * 128, false};
  throw InvalidArgument("unknown preset '" + name + "' (gpt-oss-20b, qwen3-30b-a3b, mixtral-8x7b)");
}

std::vector<LoraSite> sites_of(const Preset& p, int32_t layers) {
  return {{"q_proj", layers, 1, p.hidden, p.q_out},
          {"k_proj", layers, 1, p.hidden, p.kv_out},
          {"v_proj", layers, 1, p.hidden, p.kv_out},
          {"o_proj", layers, 1, p.q_out, p.hidden},
          {"experts.gate", layers, static_cast<int32_t>(p.experts), p.hidden, p.inter},
          {"experts.up", layers, static_cast<int32_t>(p.experts), p.hidden, p.inter},
          {"experts.down", layers, static_cast<int32_t>(p.experts), p.inter, p.hidden}};
}

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
};

// The views of the adapter's matrices, as moelora.lora.plan emits them for PEFT tensors.
AdapterSpec adapter_spec(const Preset& p, int32_t layers, int32_t rank, const std::string& file,
                         std::vector<Tensor>* tensors) {
  AdapterSpec spec;
  spec.name = "bench";
  spec.files = {file};
  const float scale = 2.0f;  // lora_alpha = 2 r
  const auto sites = sites_of(p, layers);
  for (size_t s = 0; s < sites.size(); ++s) spec.ranks.push_back(std::vector<int32_t>(layers, rank));
  auto add = [&](int32_t site, int32_t layer, int32_t expert, bool is_b, const std::string& name,
                 int64_t offset, int64_t cols, int64_t row_stride, int64_t col_stride) {
    LoraMatrixSource m;
    m.site = site;
    m.layer = layer;
    m.expert = expert;
    m.is_b = is_b;
    m.tensor = name;
    m.offset = offset;
    m.rows = rank;
    m.cols = cols;
    m.row_stride = row_stride;
    m.col_stride = col_stride;
    m.scale = is_b ? scale : 1.0f;
    spec.matrices.push_back(m);
  };
  const char* attention[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
  for (int32_t l = 0; l < layers; ++l) {
    const std::string base = "base_model.model.model.layers." + std::to_string(l);
    for (int32_t s = 0; s < 4; ++s) {
      const std::string key = base + ".self_attn." + attention[s];
      const int64_t in = sites[s].in_dim, out = sites[s].out_dim;
      tensors->push_back({key + ".lora_A.weight", {rank, in}});
      tensors->push_back({key + ".lora_B.weight", {out, rank}});
      add(s, l, 0, false, key + ".lora_A.weight", 0, in, in, 1);
      add(s, l, 0, true, key + ".lora_B.weight", 0, out, 1, rank);
    }
    const int64_t e_count = p.experts, stacked = p.experts * rank;
    const std::string gate_up = base + ".mlp.experts.base_layer", down = base + ".mlp.experts";
    tensors->push_back({gate_up + ".lora_A.weight", {stacked, p.hidden}});
    tensors->push_back({gate_up + ".lora_B.weight", {2 * p.inter, stacked}});
    tensors->push_back({down + ".lora_A.weight", {stacked, p.inter}});
    tensors->push_back({down + ".lora_B.weight", {p.hidden, stacked}});
    for (int32_t e = 0; e < e_count; ++e) {
      for (int part = 0; part < 2; ++part) {
        const int64_t first_row = p.interleaved_gate_up ? part : part * p.inter;
        const int64_t step = p.interleaved_gate_up ? 2 : 1;
        add(4 + part, l, e, false, gate_up + ".lora_A.weight", e * rank * p.hidden, p.hidden,
            p.hidden, 1);
        add(4 + part, l, e, true, gate_up + ".lora_B.weight", first_row * stacked + e, p.inter,
            e_count, step * stacked);
      }
      add(6, l, e, false, down + ".lora_A.weight", e * rank * p.inter, p.inter, p.inter, 1);
      add(6, l, e, true, down + ".lora_B.weight", e, p.hidden, e_count, stacked);
    }
  }
  return spec;
}

// Writes the safetensors file unless one of the right size is there; returns its size.
int64_t write_adapter_file(const std::string& path, const std::vector<Tensor>& tensors,
                           const std::string& dtype) {
  const int64_t elem = dtype == "F32" ? 4 : 2;
  std::string header = "{";
  int64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : tensors[i].shape) numel *= d;
    header += (i ? "," : "") + std::string("\"") + tensors[i].name + "\":{\"dtype\":\"" + dtype +
              "\",\"shape\":[" + std::to_string(tensors[i].shape[0]) + "," +
              std::to_string(tensors[i].shape[1]) + "],\"data_offsets\":[" +
              std::to_string(offset) + "," + std::to_string(offset + numel * elem) + "]}";
    offset += numel * elem;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  const int64_t size = 8 + static_cast<int64_t>(header.size()) + offset;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && st.st_size == size) return size;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw IoError("cannot write '" + path + "'");
  uint64_t n = header.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  std::fwrite(len, 1, 8, f);
  std::fwrite(header.data(), 1, header.size(), f);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<uint8_t> block(size_t{1} << 20);
  for (int64_t left = offset; left > 0;) {
    const int64_t count = std::min<int64_t>(left, static_cast<int64_t>(block.size())) / elem;
    for (int64_t k = 0; k < count; ++k) {
      const float v = normal(rng);
      if (elem == 4) {
        std::memcpy(block.data() + k * 4, &v, 4);
      } else {
        const uint16_t bits = detail::float_to_bfloat16_bits(v);
        std::memcpy(block.data() + k * 2, &bits, 2);
      }
    }
    std::fwrite(block.data(), 1, static_cast<size_t>(count * elem), f);
    left -= count * elem;
  }
  std::fflush(f);
  ::fsync(fileno(f));
  std::fclose(f);
  return size;
}

// Drops the file's pages from the page cache; returns the fraction of pages still cached.
double drop_page_cache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return 1.0;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  struct stat st {};
  ::fstat(fd, &st);
  double cached = 1.0;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t length = static_cast<size_t>(st.st_size);
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (map != MAP_FAILED) {
    std::vector<unsigned char> residency((length + page - 1) / page);
    if (::mincore(map, length, residency.data()) == 0) {
      size_t resident = 0;
      for (unsigned char r : residency) resident += r & 1;
      cached = static_cast<double>(resident) / static_cast<double>(residency.size());
    }
    ::munmap(map, length);
  }
  ::close(fd);
  return cached;
}

// N threads pread the file in `chunk` byte pieces (claimed in order) into `dst`.
void plain_parallel_read(const std::string& path, int threads, int64_t chunk, std::byte* dst,
                         int64_t bytes) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw IoError("cannot open '" + path + "'");
  std::atomic<int64_t> next{0};
  auto run = [&] {
    while (true) {
      const int64_t at = next.fetch_add(chunk);
      if (at >= bytes) return;
      int64_t left = std::min(chunk, bytes - at), offset = at;
      while (left > 0) {
        const ssize_t n = ::pread(fd, dst + offset, static_cast<size_t>(left), offset);
        if (n <= 0) throw IoError("short read of '" + path + "'");
        left -= n;
        offset += n;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run);
  run();
  for (std::thread& t : pool) t.join();
  ::close(fd);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// CPU seconds (user + system) of every thread of this process so far: the work a load costs,
// whatever else competes for the cores.
double process_cpu_seconds() {
  rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1e-6;
}

struct Options {
  std::string preset = "gpt-oss-20b";
  int32_t layers = 4;
  int32_t rank = 16;
  std::string src_dtype = "bf16";
  int threads = 4;
  int repeats = 5;
  bool cold = false;
  std::string device = "cpu";
  int64_t page_kib = 32;
  int64_t chunk_kib = 0;  // 0: the cache's default
  std::string dir = "/tmp/moelora-bench-adapters";
};

void print_line(const Options& o, const char* mode, int64_t bytes, double seconds,
                double baseline_seconds, const char* baseline, double cached_before,
                const std::string& extra = "") {
  const double gbps = static_cast<double>(bytes) / seconds / 1e9;
  const double base_gbps = static_cast<double>(bytes) / baseline_seconds / 1e9;
  std::printf(
      "{\"bench\": \"adapter_load\", \"mode\": \"%s\", \"device\": \"%s\", \"preset\": \"%s\", "
      "\"layers\": %d, \"rank\": %d, \"src_dtype\": \"%s\", \"threads\": %d, \"cold\": %s, "
      "\"page_cached_before\": %.3f, \"bytes\": %lld, \"repeats\": %d, \"median_ms\": %.3f, "
      "\"gbps\": %.3f, \"baseline\": \"%s\", \"baseline_gbps\": %.3f, "
      "\"fraction_of_baseline\": %.3f%s}\n",
      mode, o.device.c_str(), o.preset.c_str(), o.layers, o.rank, o.src_dtype.c_str(), o.threads,
      o.cold ? "true" : "false", cached_before, static_cast<long long>(bytes), o.repeats,
      seconds * 1e3, gbps, baseline, base_gbps, gbps / base_gbps, extra.c_str());
  std::fflush(stdout);
}

int run(const Options& o) {
  const Preset preset = preset_named(o.preset);
  ::mkdir(o.dir.c_str(), 0755);
  const std::string file = o.dir + "/" + o.preset + "-l" + std::to_string(o.layers) + "-r" +
                           std::to_string(o.rank) + "-" + o.src_dtype + ".safetensors";
  std::vector<Tensor> tensors;
  AdapterSpec spec = adapter_spec(preset, o.layers, o.rank, file, &tensors);
  const int64_t file_bytes = write_adapter_file(file, tensors, o.src_dtype == "f32" ? "F32" : "BF16");

  const int64_t page_bytes = o.page_kib << 10;
  AdapterCacheConfig config;
  config.sites = sites_of(preset, o.layers);
  config.max_loras = 1;
  config.max_lora_rank = o.rank;
  config.max_cpu_loras = 2;
  config.dtype = DType::kBFloat16;
  config.host_threads = 1;
  config.pack_threads = o.threads;
  if (o.chunk_kib > 0) config.read_chunk_bytes = o.chunk_kib << 10;
  const bool cuda = o.device == "cuda";
  // Pages of the rows without a shared A: at least the adapter's, room for two in the arena.
  const int64_t pages_at_most =
      AdapterRowLayout(config.sites, spec.ranks, config.dtype, page_bytes, o.rank).num_pages();
  const int64_t arena_bytes = (2 * pages_at_most + 16) * page_bytes;
  PagePool pool(cuda ? make_cuda_arena(arena_bytes, 0) : make_host_arena(arena_bytes),
                page_bytes);
  std::unique_ptr<CopyEngine> copies = cuda ? make_cuda_copy_engine(0, 2) : make_cpu_copy_engine();
  AdapterCache cache(pool, *copies, config);

  auto cold_or_warm = [&]() -> double {
    if (o.cold) return drop_page_cache(file);
    HostBuffer warm(file_bytes, false);
    plain_parallel_read(file, o.threads, int64_t{4} << 20, warm.data(), file_bytes);
    return 1.0;
  };

  // Disk -> host: the plain parallel read against the cache's host load, alternating.
  std::vector<double> plain, host, cached, plain_cpu, host_cpu;
  HostBuffer target(file_bytes, /*try_pinned=*/true);
  int64_t id = cache.register_adapter(spec);
  for (int r = 0; r < o.repeats + 1; ++r) {
    cached.push_back(cold_or_warm());
    double cpu = process_cpu_seconds();
    auto start = std::chrono::steady_clock::now();
    plain_parallel_read(file, o.threads, int64_t{4} << 20, target.data(), file_bytes);
    const double plain_s = seconds_since(start);
    const double plain_cpu_s = process_cpu_seconds() - cpu;
    cache.unregister(id);
    id = cache.register_adapter(spec);
    cold_or_warm();
    cpu = process_cpu_seconds();
    start = std::chrono::steady_clock::now();
    cache.load_host(id);
    const double host_s = seconds_since(start);
    const double host_cpu_s = process_cpu_seconds() - cpu;
    if (r > 0) {  // the first run is a warm-up (pinned allocations, thread start)
      plain.push_back(plain_s);
      host.push_back(host_s);
      plain_cpu.push_back(plain_cpu_s);
      host_cpu.push_back(host_cpu_s);
    }
  }
  const double cached_before = cached.back();
  // The host copy as the cache made it (a fused gate_up A is kept once for both sites): what a
  // device load copies, so also the size of the plain copy it is compared with.
  const int64_t host_copy_bytes = cache.stats().host_bytes;
  auto cpu_field = [](double seconds) {
    return ", \"cpu_ms\": " + std::to_string(seconds * 1e3);
  };
  print_line(o, "plain_read", file_bytes, median(plain), median(plain), "plain_read", cached_before,
             cpu_field(median(plain_cpu)));
  print_line(o, "host_load", file_bytes, median(host), median(plain), "plain_read", cached_before,
             cpu_field(median(host_cpu)) + ", \"host_copy_bytes\": " +
                 std::to_string(host_copy_bytes));

  // Registration (the files' headers checked against the sites, the row layout made): a cold
  // request waits for it before its read starts.
  std::vector<double> registration;
  AdapterSpec again = spec;
  again.name = "bench_register";
  for (int r = 0; r < 20 * o.repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    const int64_t registered = cache.register_adapter(again);
    registration.push_back(seconds_since(start));
    cache.unregister(registered);
  }
  print_line(o, "register", file_bytes, median(registration), median(plain), "plain_read",
             cached_before,
             ", \"share_of_plain_read\": " + std::to_string(median(registration) / median(plain)));
  // Disk -> device for a cold adapter (registration included), two ways alternating: streamed
  // (the device load asked for at once, so its blocks are copied while the read goes on) and
  // read then copied (the host copy made first, then the device load, as when the device load
  // is asked for after the read).
  std::vector<double> streamed, read_then_copy;
  const int64_t streamed_before = cache.stats().device_loads_streamed;
  for (int r = 0; r < o.repeats; ++r) {
    for (bool stream : {true, false}) {
      cache.unregister(id);
      cold_or_warm();
      const auto start = std::chrono::steady_clock::now();
      id = cache.register_adapter({"bench", spec.files, spec.ranks, spec.matrices});
      if (!stream) cache.load_host(id);
      cache.prefetch(id);
      cache.wait(id);
      (stream ? streamed : read_then_copy).push_back(seconds_since(start));
    }
  }
  const int64_t loads_streamed = cache.stats().device_loads_streamed - streamed_before;
  print_line(o, "disk_to_device", file_bytes, median(streamed), median(plain), "plain_read",
             cached_before,
             ", \"loads_streamed\": " + std::to_string(loads_streamed) + ", \"loads\": " +
                 std::to_string(o.repeats) + ", \"read_then_copy_ms\": " +
                 std::to_string(median(read_then_copy) * 1e3));
  if (!cuda) return 0;

  // Host -> device: two registrations of one file alternate in the only slot, host copies kept.
  spec.name = "bench_b";
  const int64_t other = cache.register_adapter(spec);
  cache.load_host(id);
  cache.load_host(other);
  std::vector<double> device, baseline;
  HostBuffer pinned(host_copy_bytes, true);
  std::memset(pinned.data(), 1, static_cast<size_t>(host_copy_bytes));
  for (int r = 0; r < 2 * o.repeats + 2; ++r) {
    const int64_t which = r % 2 == 0 ? id : other;
    auto start = std::chrono::steady_clock::now();
    cache.prefetch(which);
    cache.wait(which);
    if (r >= 2) device.push_back(seconds_since(start));
    start = std::chrono::steady_clock::now();
    copies->wait(copies->submit({{pool.arena().base(), pinned.data(), host_copy_bytes}}));
    if (r >= 2) baseline.push_back(seconds_since(start));
  }
  print_line(o, "plain_h2d", host_copy_bytes, median(baseline), median(baseline), "plain_h2d",
             1.0, std::string(", \"pinned\": ") + (pinned.pinned() ? "true" : "false"));
  print_line(o, "device_load", host_copy_bytes, median(device), median(baseline), "plain_h2d",
             1.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--preset") o.preset = next();
    else if (arg == "--layers") o.layers = std::stoi(next());
    else if (arg == "--rank") o.rank = std::stoi(next());
    else if (arg == "--src-dtype") o.src_dtype = next();
    else if (arg == "--threads") o.threads = std::stoi(next());
    else if (arg == "--repeats") o.repeats = std::stoi(next());
    else if (arg == "--cold") o.cold = true;
    else if (arg == "--device") o.device = next();
    else if (arg == "--page-kib") o.page_kib = std::stoll(next());
    else if (arg == "--chunk-kib") o.chunk_kib = std::stoll(next());
    else if (arg == "--dir") o.dir = next();
    else {
      std::fprintf(stderr,
                   "usage: %s [--preset gpt-oss-20b|qwen3-30b-a3b|mixtral-8x7b] [--layers N] "
                   "[--rank R] [--src-dtype bf16|f32] [--threads N] [--repeats N] [--cold] "
                   "[--device cpu|cuda] [--page-kib N] [--chunk-kib N] [--dir PATH]\n",
                   argv[0]);
      return 2;
    }
  }
  if (o.layers < 1 || o.rank < 1 || o.threads < 1 || o.repeats < 1 || o.page_kib < 1 ||
      (o.src_dtype != "bf16" && o.src_dtype != "f32") ||
      (o.device != "cpu" && o.device != "cuda")) {
    std::fprintf(stderr, "bad arguments (see --help)\n");
    return 2;
  }
  try {
    return run(o);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_adapter_load: %s\n", e.what());
    return 1;
  }
}
