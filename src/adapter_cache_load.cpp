// Adapter registration checks (headers only) and the disk -> host packing of weights.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <tuple>

#include "adapter_cache_internal.h"
#include "half_convert.h"
#include "moelora/error.h"

namespace moelora::detail {

namespace {

bool supported_weight_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

std::string matrix_name(const LoraMatrixSource& m) {
  return "matrix (site " + std::to_string(m.site) + ", layer " + std::to_string(m.layer) +
         ", expert " + std::to_string(m.expert) + ", " + (m.is_b ? "B" : "A") + ")";
}

// First and last element a strided [rows, cols] view touches.
std::pair<int64_t, int64_t> view_extent(const LoraMatrixSource& m) {
  int64_t lo = m.offset, hi = m.offset;
  for (int64_t step : {(m.rows - 1) * m.row_stride, (m.cols - 1) * m.col_stride}) {
    if (step < 0) lo += step;
    else hi += step;
  }
  return {lo, hi};
}

}  // namespace

std::shared_ptr<AdapterEntry> validate_adapter_spec(const AdapterSpec& spec,
                                                    const AdapterCacheConfig& config,
                                                    int64_t page_bytes) {
  const std::string& name = spec.name;
  auto fail = [&](const std::string& problem) -> void { throw AdapterError(name, problem); };
  if (name.empty()) throw AdapterError(name, "the adapter name is empty");
  const auto& sites = config.sites;
  if (spec.ranks.size() != sites.size()) {
    fail("ranks has " + std::to_string(spec.ranks.size()) + " sites, the model has " +
         std::to_string(sites.size()));
  }
  int64_t total_rank = 0;
  for (size_t s = 0; s < sites.size(); ++s) {
    if (spec.ranks[s].size() != static_cast<size_t>(sites[s].num_layers)) {
      fail("ranks of site '" + sites[s].name + "' has " + std::to_string(spec.ranks[s].size()) +
           " layers, the site has " + std::to_string(sites[s].num_layers));
    }
    for (size_t l = 0; l < spec.ranks[s].size(); ++l) {
      int32_t r = spec.ranks[s][l];
      if (r < 0 || r > config.max_lora_rank) {
        fail("rank " + std::to_string(r) + " at site '" + sites[s].name + "' layer " +
             std::to_string(l) + " is outside [0, max_lora_rank=" +
             std::to_string(config.max_lora_rank) + "]");
      }
      total_rank += r;
    }
  }
  if (total_rank == 0) fail("targets no site (every rank is 0)");

  auto entry = std::make_shared<AdapterEntry>();
  entry->name = name;
  entry->spec = spec;
  for (const std::string& path : spec.files) {
    try {
      entry->files.push_back(SafetensorsFile::open(path));
    } catch (const Error& e) {
      fail(e.what());
    }
  }

  std::set<std::tuple<int32_t, int32_t, int32_t, bool>> covered;
  for (const LoraMatrixSource& m : spec.matrices) {
    const std::string what = matrix_name(m);
    if (m.site < 0 || m.site >= static_cast<int32_t>(sites.size())) fail(what + ": no such site");
    const LoraSite& site = sites[m.site];
    if (m.layer < 0 || m.layer >= site.num_layers) fail(what + ": no such layer");
    if (m.expert < 0 || m.expert >= site.num_experts) fail(what + ": no such expert");
    const int32_t rank = spec.ranks[m.site][m.layer];
    if (rank == 0) fail(what + ": site '" + site.name + "' is not targeted at this layer");
    if (!covered.insert({m.site, m.layer, m.expert, m.is_b}).second) {
      fail(what + ": given more than once");
    }
    if (m.file < 0 || m.file >= static_cast<int32_t>(entry->files.size())) {
      fail(what + ": file index " + std::to_string(m.file) + " out of range");
    }
    const SafetensorsFile& file = entry->files[m.file];
    if (!file.contains(m.tensor)) {
      fail(what + ": tensor '" + m.tensor + "' not found in '" + file.path() + "'");
    }
    const SafetensorInfo& info = file.tensor(m.tensor);
    if (!supported_weight_dtype(info.dtype)) {
      fail(what + ": tensor '" + m.tensor + "' has unsupported dtype " + dtype_name(info.dtype));
    }
    const int64_t expected_cols = m.is_b ? site.out_dim : site.in_dim;
    if (m.rows != rank) {
      fail(what + ": view has " + std::to_string(m.rows) + " rows but the rank is " +
           std::to_string(rank));
    }
    if (m.cols != expected_cols) {
      fail(what + ": view has " + std::to_string(m.cols) + " columns, expected " +
           std::to_string(expected_cols) + (m.is_b ? " (out_dim)" : " (in_dim)"));
    }
    auto [lo, hi] = view_extent(m);
    if (lo < 0 || hi >= info.numel()) {
      fail(what + ": strided view of tensor '" + m.tensor + "' (offset " +
           std::to_string(m.offset) + ", strides " + std::to_string(m.row_stride) + ", " +
           std::to_string(m.col_stride) + ") reaches elements [" + std::to_string(lo) + ", " +
           std::to_string(hi) + "] outside its " + std::to_string(info.numel()) + " elements");
    }
    if (!std::isfinite(m.scale)) fail(what + ": scale is not finite");
    entry->matrix_tensors.push_back(info);
  }
  for (size_t s = 0; s < sites.size(); ++s) {
    for (int32_t l = 0; l < sites[s].num_layers; ++l) {
      if (spec.ranks[s][l] == 0) continue;
      for (int32_t e = 0; e < sites[s].num_experts; ++e) {
        for (bool is_b : {false, true}) {
          if (!covered.count({static_cast<int32_t>(s), l, e, is_b})) {
            fail("no source for site '" + sites[s].name + "' layer " + std::to_string(l) +
                 " expert " + std::to_string(e) + (is_b ? " B" : " A"));
          }
        }
      }
    }
  }
  try {
    entry->layout = std::make_unique<AdapterRowLayout>(sites, spec.ranks, config.dtype,
                                                       page_bytes, config.max_lora_rank);
  } catch (const InvalidArgument& e) {
    fail(e.what());
  }
  return entry;
}

HostBuffer pack_adapter_rows(const AdapterEntry& entry, DType dtype) {
  const AdapterRowLayout& layout = *entry.layout;
  HostBuffer buffer(layout.num_pages() * layout.page_bytes());
  std::memset(buffer.data(), 0, static_cast<size_t>(buffer.bytes()));  // zero the row tails
  std::vector<std::byte> scratch;
  for (size_t i = 0; i < entry.spec.matrices.size(); ++i) {
    const LoraMatrixSource& m = entry.spec.matrices[i];
    const SafetensorInfo& info = entry.matrix_tensors[i];
    const SafetensorsFile& file = entry.files[m.file];
    const int64_t elem = static_cast<int64_t>(dtype_size(info.dtype));
    auto [lo, hi] = view_extent(m);
    scratch.resize(static_cast<size_t>((hi - lo + 1) * elem));
    try {
      file.read_tensor_bytes(info, lo * elem, (hi - lo + 1) * elem, scratch.data());
    } catch (const Error& e) {
      throw AdapterError(entry.name, e.what());
    }
    const float scale = m.is_b ? m.scale : 1.0f;
    for (int64_t r = 0; r < m.rows; ++r) {
      std::byte* row = buffer.data() + layout.row_offset(m.site, m.layer, m.expert, m.is_b,
                                                         static_cast<int>(r));
      for (int64_t c = 0; c < m.cols; ++c) {
        const int64_t index = m.offset + r * m.row_stride + c * m.col_stride - lo;
        const float source = load_as_float(scratch.data(), info.dtype, index);
        const float value = source * scale;
        store_from_float(row, dtype, c, value);
        if (!std::isfinite(load_as_float(row, dtype, c))) {
          throw AdapterError(entry.name,
                             "tensor '" + m.tensor + "' in '" + file.path() + "' has " +
                                 (std::isfinite(source) ? "a value that overflows " +
                                                              std::string(dtype_name(dtype))
                                                        : std::string("a non-finite value")) +
                                 " at [" + std::to_string(r) + ", " + std::to_string(c) +
                                 "] of " + matrix_name(m));
        }
      }
    }
  }
  return buffer;
}

}  // namespace moelora::detail
