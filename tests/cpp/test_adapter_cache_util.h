// Test helper: adapters in every view shape the loader handles, written as real safetensors
// files, with an independent reference for every stored element and the page bytes no row holds.
//
// Sites (2 layers, ranks per layer given): q_proj dense (A [r, 37] rows; B [29, r] read down
// its columns), experts.gate / experts.up (3 experts, fused A [E*r, 40] shared by both, fused B
// [2*22, E*r] with interleaved or stacked gate/up rows), experts.down (A [E*r, 22]; B stored per
// expert [E, 40, r]) and o_proj (A rows stored reversed, read with column stride -1; B [37, r]
// read in reverse rank order: the generic strided path). A 3-element tensor comes first so
// every other tensor starts at an unaligned byte offset.
#pragma once

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "half_convert.h"
#include "moelora/adapter_cache.h"
#include "safetensors_writer.h"

namespace moelora_test {

inline std::vector<moelora::LoraSite> awkward_sites() {
  return {{"q_proj", 2, 1, 37, 29},
          {"experts.gate", 2, 3, 40, 22},
          {"experts.up", 2, 3, 40, 22},
          {"experts.down", 2, 3, 22, 40},
          {"o_proj", 2, 1, 29, 37}};
}

// A full-mantissa value in [-2, 2) for element k of a tensor.
inline float awkward_value(uint32_t seed, int64_t k) {
  uint32_t h = seed * 2654435761u ^ static_cast<uint32_t>(k) * 2246822519u;
  h ^= h >> 15;
  h *= 2654435761u;
  h ^= h >> 13;
  return static_cast<float>(h % 1000003u) / 250000.75f - 2.0f;
}

// The value as stored in `dtype` ("F32", "BF16", "F16"), back as float.
inline float round_to(const std::string& dtype, float v) {
  if (dtype == "BF16") {
    return moelora::detail::bfloat16_bits_to_float(moelora::detail::float_to_bfloat16_bits(v));
  }
  if (dtype == "F16") {
    return moelora::detail::half_bits_to_float(moelora::detail::float_to_half_bits(v));
  }
  return v;
}

struct AwkwardAdapter {
  moelora::AdapterSpec spec;
  std::string src_dtype;
  std::vector<uint32_t> seeds;  // per spec.matrices entry: its tensor's seed
  // Source element `flat` of the tensor behind matrix `m`, as stored in the file.
  float source(size_t m, int64_t flat) const { return round_to(src_dtype, awkward_value(seeds[m], flat)); }
};

struct AwkwardOptions {
  std::string src_dtype = "BF16";
  bool interleaved_gate_up = true;
  float scale = 0.75f;
  std::vector<int32_t> ranks = {4, 7};  // per layer, for every site
  // Poison: element `poison_flat` of tensor `poison_tensor` becomes `poison_value`.
  std::string poison_tensor;
  int64_t poison_flat = 0;
  float poison_value = 0.0f;
};

inline AwkwardAdapter write_awkward_adapter(const std::string& name, const std::string& path,
                                            const AwkwardOptions& o) {
  using moelora::LoraMatrixSource;
  const auto sites = awkward_sites();
  AwkwardAdapter out;
  out.src_dtype = o.src_dtype;
  out.spec.name = name;
  out.spec.files = {path};
  for (size_t s = 0; s < sites.size(); ++s) out.spec.ranks.push_back(o.ranks);
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"pad", "BF16", {3}, std::vector<uint8_t>(6, 0)});
  uint32_t next_seed = 11;
  auto add_tensor = [&](const std::string& tensor, std::vector<int64_t> shape) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const uint32_t seed = next_seed++;
    std::vector<uint8_t> bytes;
    for (int64_t k = 0; k < numel; ++k) {
      float v = awkward_value(seed, k);
      if (tensor == o.poison_tensor && k == o.poison_flat) v = o.poison_value;
      if (o.src_dtype == "F32") {
        uint8_t b[4];
        std::memcpy(b, &v, 4);
        bytes.insert(bytes.end(), b, b + 4);
      } else {
        const uint16_t bits = o.src_dtype == "BF16" ? moelora::detail::float_to_bfloat16_bits(v)
                                                    : moelora::detail::float_to_half_bits(v);
        bytes.push_back(static_cast<uint8_t>(bits & 0xFF));
        bytes.push_back(static_cast<uint8_t>(bits >> 8));
      }
    }
    tensors.push_back({tensor, o.src_dtype, std::move(shape), std::move(bytes)});
    return seed;
  };
  auto add_view = [&](uint32_t seed, int32_t site, int32_t layer, int32_t expert, bool is_b,
                      const std::string& tensor, int64_t offset, int64_t rows, int64_t cols,
                      int64_t row_stride, int64_t col_stride) {
    LoraMatrixSource m;
    m.site = site;
    m.layer = layer;
    m.expert = expert;
    m.is_b = is_b;
    m.tensor = tensor;
    m.offset = offset;
    m.rows = rows;
    m.cols = cols;
    m.row_stride = row_stride;
    m.col_stride = col_stride;
    m.scale = is_b ? o.scale : 1.0f;
    out.spec.matrices.push_back(m);
    out.seeds.push_back(seed);
  };
  for (int32_t l = 0; l < 2; ++l) {
    const int64_t r = o.ranks[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    // q_proj: A [r, 37], B [29, r].
    uint32_t a = add_tensor(p + "q.A", {r, 37}), b = add_tensor(p + "q.B", {29, r});
    add_view(a, 0, l, 0, false, p + "q.A", 0, r, 37, 37, 1);
    add_view(b, 0, l, 0, true, p + "q.B", 0, r, 29, 1, r);
    // experts.gate / up: A [E*r, 40] shared; B [44, E*r], gate/up rows interleaved or stacked.
    const int64_t e_count = 3, stacked = e_count * r;
    a = add_tensor(p + "gate_up.A", {stacked, 40});
    b = add_tensor(p + "gate_up.B", {44, stacked});
    for (int32_t e = 0; e < e_count; ++e) {
      for (int32_t part = 0; part < 2; ++part) {
        const int64_t first = o.interleaved_gate_up ? part : part * 22;
        const int64_t step = o.interleaved_gate_up ? 2 : 1;
        add_view(a, 1 + part, l, e, false, p + "gate_up.A", e * r * 40, r, 40, 40, 1);
        add_view(b, 1 + part, l, e, true, p + "gate_up.B", first * stacked + e, r, 22, e_count,
                 step * stacked);
      }
    }
    // experts.down: A [E*r, 22]; B per expert [E, 40, r].
    a = add_tensor(p + "down.A", {stacked, 22});
    b = add_tensor(p + "down.B", {e_count, 40, r});
    for (int32_t e = 0; e < e_count; ++e) {
      add_view(a, 3, l, e, false, p + "down.A", e * r * 22, r, 22, 22, 1);
      add_view(b, 3, l, e, true, p + "down.B", e * 40 * r, r, 40, 1, r);
    }
    // o_proj: A rows reversed (column stride -1); B [37, r] in reverse rank order.
    a = add_tensor(p + "o.A", {r, 29});
    b = add_tensor(p + "o.B", {37, r});
    add_view(a, 4, l, 0, false, p + "o.A", 28, r, 29, 29, -1);
    add_view(b, 4, l, 0, true, p + "o.B", r - 1, r, 37, -1, r);
  }
  write_safetensors(path, tensors);
  return out;
}

// Mismatching elements of the adapter in `slot` (read through the row tables of `view_of(site,
// layer)`) against the reference: source value times scale, rounded once to `model`.
template <typename ViewOf>
int64_t awkward_mismatches(ViewOf&& view_of, const AwkwardAdapter& adapter, int32_t slot,
                           moelora::DType model) {
  using namespace moelora;
  int64_t bad = 0;
  for (size_t index = 0; index < adapter.spec.matrices.size(); ++index) {
    const LoraMatrixSource& m = adapter.spec.matrices[index];
    LoraSiteView view = view_of(m.site, m.layer);
    if (view.rank(slot) != m.rows) ++bad;
    for (int64_t i = 0; i < m.rows; ++i) {
      const std::byte* row = view.row(slot, m.expert, m.is_b, static_cast<int>(i));
      for (int64_t j = 0; j < m.cols; ++j) {
        const float product =
            adapter.source(index, m.offset + i * m.row_stride + j * m.col_stride) *
            (m.is_b ? m.scale : 1.0f);
        float expected = product;
        if (model == DType::kBFloat16) {
          expected = detail::bfloat16_bits_to_float(detail::float_to_bfloat16_bits(product));
        } else if (model == DType::kFloat16) {
          expected = detail::half_bits_to_float(detail::float_to_half_bits(product));
        }
        if (detail::load_as_float(row, model, j) != expected) ++bad;
      }
    }
  }
  return bad;
}

}  // namespace moelora_test
