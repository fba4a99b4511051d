// The conversion of B matrices read down their columns (stored [out, r] or fused [out, E*r],
// kept as B^T rows), against a reference computed here with plain loops: random 16- and 32-bit
// tensors of odd sizes and of one whose rows fill whole cache lines (out 160), dense and fused
// experts (gate/up rows interleaved or stacked, rank columns strided by the expert count or
// expert-major), scales 1 and 0.37, chunks that cut the tensors into many pieces and chunks that
// hold them whole. Every stored byte of every row must equal the reference, row padding
// included. A NaN, an Inf or a value that overflows once scaled, put at tile corners, tile edges
// and the tensor's edges, fails the load naming that element; of several in one chunk, the first
// in view order (matrix, row, column) is named.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "moelora/adapter_cache.h"
#include "moelora/error.h"
#include "moelora/runtime.h"
#include "safetensors_writer.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

namespace {

constexpr int64_t kPageBytes = 1024;
constexpr int64_t kIn = 24;

// ---- the reference: decoding and round-to-nearest-even encoding, written from the formats ----

uint32_t bits_of(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  return x;
}

float float_of(uint32_t x) {
  float v;
  std::memcpy(&v, &x, 4);
  return v;
}

// A bfloat16 ("BF16") or float16 ("F16") value.
float decode16(const std::string& dtype, uint32_t b) {
  if (dtype == "BF16") return float_of(b << 16);
  const double sign = (b & 0x8000u) ? -1.0 : 1.0;
  const int exponent = static_cast<int>((b >> 10) & 31u);
  const int mantissa = static_cast<int>(b & 1023u);
  if (exponent == 31) return mantissa == 0 ? static_cast<float>(sign * INFINITY) : NAN;
  if (exponent == 0) return static_cast<float>(sign * std::ldexp(mantissa, -24));
  return static_cast<float>(sign * std::ldexp(1024 + mantissa, exponent - 25));
}

// The little-endian element at `p` of a "F32", "BF16" or "F16" tensor.
float decode(const std::string& dtype, const uint8_t* p) {
  if (dtype == "F32") {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  return decode16(dtype, uint32_t{p[0]} | uint32_t{p[1]} << 8);
}

// The upper half of the bits, rounded to nearest, ties to even (finite values).
uint16_t encode_bf16(float v) {
  const uint32_t x = bits_of(v);
  uint32_t kept = x >> 16;
  const uint32_t rest = x & 0xFFFFu;
  if (rest > 0x8000u || (rest == 0x8000u && (kept & 1u))) ++kept;
  return static_cast<uint16_t>(kept);
}

// IEEE binary16, rounded to nearest, ties to even (finite values; too large: infinity).
uint16_t encode_f16(float v) {
  const uint16_t sign = std::signbit(v) ? 0x8000u : 0u;
  const double a = std::fabs(static_cast<double>(v));
  if (a >= 65520.0) return sign | 0x7C00u;
  if (a < std::ldexp(1.0, -14)) {  // subnormal units of 2^-24 (1024 units: the least normal)
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24)));
  }
  int e = 0;
  const double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  double q = std::nearbyint((m * 2.0 - 1.0) * 1024.0);
  int exponent = e - 1 + 15;
  if (q == 1024.0) {
    q = 0;
    ++exponent;
  }
  if (exponent >= 31) return sign | 0x7C00u;
  return static_cast<uint16_t>(sign | exponent << 10 | static_cast<uint16_t>(q));
}

// The model-dtype bytes of `product`.
std::vector<uint8_t> encode(DType model, float product) {
  std::vector<uint8_t> out(dtype_size(model));
  if (model == DType::kFloat32) {
    std::memcpy(out.data(), &product, 4);
  } else {
    const uint16_t b = model == DType::kBFloat16 ? encode_bf16(product) : encode_f16(product);
    out[0] = static_cast<uint8_t>(b & 0xFF);
    out[1] = static_cast<uint8_t>(b >> 8);
  }
  return out;
}

// ---- adapters ---------------------------------------------------------------------------------

enum class FusedLayout { kInterleaved, kStacked };

struct Shape {
  int64_t out = 7;
  int32_t rank = 1;
  int32_t experts = 1;
  FusedLayout gate_up = FusedLayout::kInterleaved;
};

// Sites: 0 "dense" B [out, r]; 1 "gate" and 2 "up" reading one fused B [2*out, E*r] (rank i of
// expert e in column e + i*E, gate/up rows interleaved or stacked); 3 "down" B [out, E*r] with
// expert-major columns (rank i of expert e in column e*r + i). Every A is its own [E*r, 24].
std::vector<LoraSite> sites_of(const Shape& s) {
  return {{"dense", 1, 1, kIn, s.out},
          {"gate", 1, s.experts, kIn, s.out},
          {"up", 1, s.experts, kIn, s.out},
          {"down", 1, s.experts, kIn, s.out}};
}

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

struct Adapter {
  AdapterSpec spec;
  std::string dtype;
  std::vector<Tensor> tensors;
  const Tensor& tensor(const std::string& name) const {
    for (const Tensor& t : tensors) {
      if (t.name == name) return t;
    }
    throw std::runtime_error("no tensor " + name);
  }
  // Element `flat` of the tensor behind matrix `m`, decoded.
  float source(const LoraMatrixSource& m, int64_t flat) const {
    const int64_t elem = dtype == "F32" ? 4 : 2;
    return decode(dtype, tensor(m.tensor).bytes.data() + flat * elem);
  }
  void write(const std::string& path) const {
    std::vector<TensorToWrite> out;
    out.push_back({"pad", "BF16", {3}, std::vector<uint8_t>(6, 0)});  // every tensor unaligned
    for (const Tensor& t : tensors) out.push_back({t.name, dtype, t.shape, t.bytes});
    write_safetensors(path, out);
  }
};

// Random finite values of `dtype` whose products with `scale` (B) and 1 (A) are finite in
// `model`; bfloat16 and float16 ones are random bit patterns (subnormals included).
std::vector<uint8_t> random_values(std::mt19937& rng, const std::string& dtype, DType model,
                                   float scale, int64_t numel) {
  const double limit = model == DType::kFloat16 ? 65504.0 : 3.0e38;
  const double largest_scale = std::max(1.0, static_cast<double>(scale));
  auto fits = [&](float v) { return std::fabs(static_cast<double>(v)) * largest_scale < limit; };
  std::vector<uint8_t> bytes;
  for (int64_t k = 0; k < numel; ++k) {
    if (dtype == "F32") {
      float v = 0;
      do {  // wide exponents, full mantissas
        v = std::ldexp(static_cast<float>(rng() % 0x1000000u) / 0x1p24f,
                       static_cast<int>(rng() % 80) - 60) *
            ((rng() & 1) ? -1.0f : 1.0f);
      } while (!fits(v));
      uint8_t b[4];
      std::memcpy(b, &v, 4);
      bytes.insert(bytes.end(), b, b + 4);
      continue;
    }
    uint8_t b[2];
    float v = 0;
    do {
      const uint16_t bits = static_cast<uint16_t>(rng());
      b[0] = static_cast<uint8_t>(bits & 0xFF);
      b[1] = static_cast<uint8_t>(bits >> 8);
      v = decode16(dtype, bits);
    } while (!std::isfinite(v) || !fits(v));
    bytes.insert(bytes.end(), b, b + 2);
  }
  return bytes;
}

Adapter make_adapter(const std::string& name, const std::string& path, const Shape& s,
                     const std::string& dtype, DType model, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  Adapter a;
  a.dtype = dtype;
  a.spec.name = name;
  a.spec.files = {path};
  a.spec.ranks = std::vector<std::vector<int32_t>>(4, std::vector<int32_t>{s.rank});
  const int64_t r = s.rank, e_count = s.experts, stacked = e_count * r;
  auto add_tensor = [&](const std::string& tensor, std::vector<int64_t> shape) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    a.tensors.push_back({tensor, shape, random_values(rng, dtype, model, scale, numel)});
  };
  auto add_view = [&](int32_t site, int32_t expert, bool is_b, const std::string& tensor,
                      int64_t offset, int64_t cols, int64_t row_stride, int64_t col_stride) {
    LoraMatrixSource m;
    m.site = site;
    m.expert = expert;
    m.is_b = is_b;
    m.tensor = tensor;
    m.offset = offset;
    m.rows = r;
    m.cols = cols;
    m.row_stride = row_stride;
    m.col_stride = col_stride;
    m.scale = is_b ? scale : 1.0f;
    a.spec.matrices.push_back(m);
  };
  add_tensor("dense.A", {r, kIn});
  add_tensor("dense.B", {s.out, r});
  add_view(0, 0, false, "dense.A", 0, kIn, kIn, 1);
  add_view(0, 0, true, "dense.B", 0, s.out, 1, r);
  add_tensor("gate.A", {stacked, kIn});
  add_tensor("up.A", {stacked, kIn});
  add_tensor("gate_up.B", {2 * s.out, stacked});
  const bool interleaved = s.gate_up == FusedLayout::kInterleaved;
  for (int32_t e = 0; e < s.experts; ++e) {
    for (int32_t part = 0; part < 2; ++part) {
      const int64_t first_row = interleaved ? part : part * s.out;
      add_view(1 + part, e, false, part == 0 ? "gate.A" : "up.A", e * r * kIn, kIn, kIn, 1);
      add_view(1 + part, e, true, "gate_up.B", first_row * stacked + e, s.out, e_count,
               (interleaved ? 2 : 1) * stacked);
    }
  }
  add_tensor("down.A", {stacked, kIn});
  add_tensor("down.B", {s.out, stacked});
  for (int32_t e = 0; e < s.experts; ++e) {
    add_view(3, e, false, "down.A", e * r * kIn, kIn, kIn, 1);
    add_view(3, e, true, "down.B", e * r, s.out, 1, stacked);
  }
  a.write(path);
  return a;
}

// Puts the bits of `value` (as the adapter's dtype stores it) at element (i, j) of matrix
// `index`'s view and rewrites the file.
void poison(Adapter& a, size_t index, int64_t i, int64_t j, float value) {
  const LoraMatrixSource& m = a.spec.matrices[index];
  const int64_t flat = m.offset + i * m.row_stride + j * m.col_stride;
  for (Tensor& t : a.tensors) {
    if (t.name != m.tensor) continue;
    if (a.dtype == "F32") {
      std::memcpy(t.bytes.data() + flat * 4, &value, 4);
    } else {
      const uint32_t x = bits_of(value);
      // Infinities and NaN keep their class in either 16-bit format; finite values are exact.
      uint16_t b = static_cast<uint16_t>(x >> 16);
      if (a.dtype == "F16") {
        b = std::isnan(value) ? 0x7E00u
            : std::isinf(value) ? static_cast<uint16_t>((x >> 16 & 0x8000u) | 0x7C00u)
                                : encode_f16(value);
      }
      t.bytes[flat * 2] = static_cast<uint8_t>(b & 0xFF);
      t.bytes[flat * 2 + 1] = static_cast<uint8_t>(b >> 8);
    }
  }
  a.write(a.spec.files[0]);
}

struct Cache {
  Cache(const Shape& s, DType model, int64_t chunk)
      : pool(make_host_arena(kPageBytes * 1024), kPageBytes), copies(make_cpu_copy_engine()) {
    AdapterCacheConfig config;
    config.sites = sites_of(s);
    config.max_loras = 1;
    config.max_lora_rank = 16;
    config.dtype = model;
    config.host_threads = 1;
    config.pack_threads = 2;
    config.read_chunk_bytes = chunk;
    cache = std::make_unique<AdapterCache>(pool, *copies, config);
  }
  ~Cache() { cache.reset(); }
  PagePool pool;
  std::unique_ptr<CopyEngine> copies;
  std::unique_ptr<AdapterCache> cache;
};

// Rows of the loaded adapter whose bytes differ from the reference (padding must be zero).
int64_t mismatching_rows(const Cache& c, const Adapter& a, int32_t slot, DType model) {
  int64_t bad = 0;
  for (const LoraMatrixSource& m : a.spec.matrices) {
    const LoraSiteView view = c.cache->site_view(m.site, m.layer);
    for (int64_t i = 0; i < m.rows; ++i) {
      const auto* row = reinterpret_cast<const uint8_t*>(
          view.row(slot, m.expert, m.is_b, static_cast<int>(i)));
      std::vector<uint8_t> expected;
      for (int64_t j = 0; j < m.cols; ++j) {
        const float product = a.source(m, m.offset + i * m.row_stride + j * m.col_stride) *
                              (m.is_b ? m.scale : 1.0f);
        const std::vector<uint8_t> bytes = encode(model, product);
        expected.insert(expected.end(), bytes.begin(), bytes.end());
      }
      expected.resize(static_cast<size_t>(lora_row_bytes(m.cols, model)), 0);
      if (std::memcmp(row, expected.data(), expected.size()) != 0) {
        if (bad == 0) {
          for (size_t k = 0; k < expected.size(); ++k) {
            if (row[k] == expected[k]) continue;
            std::fprintf(stderr,
                         "  first difference: %s expert %d row %lld byte %zu: %02x vs %02x\n",
                         m.tensor.c_str(), m.expert, static_cast<long long>(i), k, row[k],
                         expected[k]);
            break;
          }
        }
        ++bad;
      }
    }
  }
  return bad;
}

const char* layout_name(FusedLayout l) {
  return l == FusedLayout::kInterleaved ? "interleaved" : "stacked";
}

std::string describe(const Shape& s, const std::string& dtype, DType model, float scale,
                     int64_t chunk) {
  return "out " + std::to_string(s.out) + " r " + std::to_string(s.rank) + " E " +
         std::to_string(s.experts) + " " + layout_name(s.gate_up) + " " + dtype + " -> " +
         dtype_name(model) + " scale " + std::to_string(scale) + " chunk " +
         std::to_string(chunk);
}

bool contains(const std::string& text, const std::string& needle) {
  if (text.find(needle) != std::string::npos) return true;
  std::fprintf(stderr, "  message '%s' lacks '%s'\n", text.c_str(), needle.c_str());
  return false;
}

// "tensor 'T' holds WHAT (at [i, j] of matrix (site S, layer 0, expert E, B)".
std::string named_element(const LoraMatrixSource& m, const std::string& what, int64_t i,
                          int64_t j) {
  return "tensor '" + m.tensor + "' holds " + what + " (at [" + std::to_string(i) + ", " +
         std::to_string(j) + "] of matrix (site " + std::to_string(m.site) + ", layer 0, expert " +
         std::to_string(m.expert) + ", B), file '";
}

// The index of the B matrix of `site` and `expert` in make_adapter's spec.
size_t b_index(const Adapter& a, int32_t site, int32_t expert) {
  for (size_t k = 0; k < a.spec.matrices.size(); ++k) {
    const LoraMatrixSource& m = a.spec.matrices[k];
    if (m.is_b && m.site == site && m.expert == expert) return k;
  }
  throw std::runtime_error("no such B");
}

struct DTypes {
  const char* source;
  DType model;
};

}  // namespace

TEST_CASE("B read down columns converts exactly: odd shapes, layouts, dtypes, scales, chunks") {
  const DTypes pairs[] = {{"BF16", DType::kBFloat16}, {"F16", DType::kFloat16},
                          {"BF16", DType::kFloat16},  {"F16", DType::kBFloat16},
                          {"BF16", DType::kFloat32},  {"F32", DType::kBFloat16}};
  int64_t loads = 0, failed = 0;
  uint32_t seed = 1;
  for (int64_t out : {int64_t{7}, int64_t{111}, int64_t{133}, int64_t{160}}) {
    for (int32_t rank : {1, 3, 16}) {
      for (int32_t experts : {1, 3}) {
        for (FusedLayout layout : {FusedLayout::kInterleaved, FusedLayout::kStacked}) {
          for (const DTypes& d : pairs) {
            for (float scale : {1.0f, 0.37f}) {
              for (int64_t chunk : {int64_t{4096}, int64_t{1} << 20}) {
                const Shape s{out, rank, experts, layout};
                Cache c(s, d.model, chunk);
                const Adapter a = make_adapter("convert", temp_path("convert.st"), s, d.source,
                                               d.model, scale, seed++);
                const int64_t id = c.cache->register_adapter(a.spec);
                const int32_t slot = c.cache->wait(id);
                const int64_t bad = mismatching_rows(c, a, slot, d.model);
                ++loads;
                if (bad != 0) {
                  ++failed;
                  std::fprintf(stderr, "  %s: %lld rows differ\n",
                               describe(s, d.source, d.model, scale, chunk).c_str(),
                               static_cast<long long>(bad));
                }
                std::remove(a.spec.files[0].c_str());
              }
            }
          }
        }
      }
    }
  }
  CHECK_EQ(failed, int64_t{0});
  std::printf("  (%lld loads)\n", static_cast<long long>(loads));
}

TEST_CASE("a non-finite element of B is named where it is: tile corners and edges, tensor edges") {
  struct Bad {
    const char* source;
    DType model;
    float scale;
    float value;
    const char* what;
  };
  const Bad bads[] = {
      {"BF16", DType::kBFloat16, 0.37f, NAN, "NaN"},
      {"BF16", DType::kBFloat16, 1.0f, INFINITY, "Inf"},
      {"F16", DType::kFloat16, 0.37f, -INFINITY, "Inf"},
      {"F16", DType::kBFloat16, 1.0f, NAN, "NaN"},
      {"BF16", DType::kBFloat16, 3.0f, 2e38f, "a value that overflows bfloat16"},
      {"BF16", DType::kFloat16, 0.37f, 1e6f, "a value that overflows float16"},
      {"F16", DType::kFloat16, 1.0f, NAN, "NaN"},
  };
  int64_t cases = 0;
  for (int64_t out : {int64_t{133}, int64_t{160}}) {
    const FusedLayout layout = out == 133 ? FusedLayout::kInterleaved : FusedLayout::kStacked;
    const Shape s{out, 16, 3, layout};
    for (const Bad& bad : bads) {
      for (int64_t chunk : {int64_t{4096}, int64_t{1} << 20}) {
        // (site, expert, i, j): tile corners (0, 7, 8), the last row and column, the first.
        const int64_t last_i = s.rank - 1, last_j = s.out - 1;
        const std::vector<std::vector<int64_t>> places = {
            {0, 0, 0, 0},          {0, 0, 7, 7},           {0, 0, 8, 8},
            {0, 0, last_i, last_j}, {1, 0, 0, 0},           {1, 2, 7, 8},
            {2, 1, 5, 127},        {2, 2, last_i, last_j}, {1, 1, last_i, 7},
            {3, 2, 7, 0},          {3, 0, 8, 128},         {2, 0, 0, 64}};
        for (const auto& p : places) {
          Cache c(s, bad.model, chunk);
          Adapter a = make_adapter("bad", temp_path("bad.st"), s, bad.source, bad.model,
                                   bad.scale, static_cast<uint32_t>(cases + 100));
          const size_t index = b_index(a, static_cast<int32_t>(p[0]), static_cast<int32_t>(p[1]));
          poison(a, index, p[2], p[3], bad.value);
          const int64_t id = c.cache->register_adapter(a.spec);
          CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
          const std::string message = c.cache->error_message(id);
          if (!contains(message, named_element(a.spec.matrices[index], bad.what, p[2], p[3]))) {
            std::fprintf(stderr, "  %s\n",
                         describe(s, bad.source, bad.model, bad.scale, chunk).c_str());
          }
          std::remove(a.spec.files[0].c_str());
          ++cases;
        }
      }
    }
  }
  std::printf("  (%lld loads)\n", static_cast<long long>(cases));
}

TEST_CASE("of several non-finite elements in one chunk, the first in view order is named") {
  for (const char* dtype : {"BF16", "F16"}) {
    for (FusedLayout layout : {FusedLayout::kInterleaved, FusedLayout::kStacked}) {
      const Shape s{111, 16, 3, layout};
      const DType model = std::string(dtype) == "BF16" ? DType::kBFloat16 : DType::kFloat16;
      // Within one matrix: the lower row wins, whatever the columns.
      {
        Cache c(s, model, int64_t{1} << 20);
        Adapter a = make_adapter("first_row", temp_path("first.st"), s, dtype, model, 0.37f, 7);
        const size_t gate1 = b_index(a, 1, 1);
        poison(a, gate1, 5, 2, NAN);
        poison(a, gate1, 1, 90, INFINITY);
        poison(a, gate1, 1, 100, NAN);
        const int64_t id = c.cache->register_adapter(a.spec);
        CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
        CHECK(contains(c.cache->error_message(id),
                       named_element(a.spec.matrices[gate1], "Inf", 1, 90)));
        std::remove(a.spec.files[0].c_str());
      }
      // Across the matrices of one tensor: the one listed first in the spec wins.
      {
        Cache c(s, model, int64_t{1} << 20);
        Adapter a = make_adapter("first_matrix", temp_path("first.st"), s, dtype, model, 1.0f, 8);
        const size_t up1 = b_index(a, 2, 1), gate2 = b_index(a, 1, 2);
        CHECK(up1 < gate2);
        poison(a, gate2, 0, 0, NAN);
        poison(a, up1, 9, 50, -INFINITY);
        const int64_t id = c.cache->register_adapter(a.spec);
        CHECK_THROWS_AS(c.cache->wait(id), AdapterError);
        CHECK(contains(c.cache->error_message(id),
                       named_element(a.spec.matrices[up1], "Inf", 9, 50)));
        std::remove(a.spec.files[0].c_str());
      }
    }
  }
}

MOELORA_TEST_MAIN()
