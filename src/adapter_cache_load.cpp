// Adapter registration checks (headers only) and the disk -> host packing of weights.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <set>
#include <system_error>
#include <thread>
#include <tuple>
#include <vector>

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

// Source row elements as float32: the dtype switch sits outside the element loop.
void row_to_float(const std::byte* src, DType dtype, int64_t first, int64_t stride, int64_t n,
                  float* out) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = reinterpret_cast<const float*>(src) + first;
      for (int64_t c = 0; c < n; ++c) out[c] = p[c * stride];
    } break;
    case DType::kBFloat16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(src) + first;
      for (int64_t c = 0; c < n; ++c) {
        const uint32_t bits = uint32_t{p[c * stride]} << 16;
        std::memcpy(&out[c], &bits, sizeof(float));
      }
    } break;
    default:
      for (int64_t c = 0; c < n; ++c) out[c] = load_as_float(src, dtype, first + c * stride);
  }
}

// Stores scale * values as `dtype` into a packed row; returns the first column whose stored
// value is not finite (a non-finite source or an overflow of the target type), or -1.
int64_t float_to_row(const float* values, float scale, DType dtype, std::byte* row, int64_t n) {
  int64_t bad = -1;
  switch (dtype) {
    case DType::kFloat32: {
      float* out = reinterpret_cast<float*>(row);
      for (int64_t c = 0; c < n; ++c) {
        out[c] = values[c] * scale;
        if (bad < 0 && !std::isfinite(out[c])) bad = c;
      }
    } break;
    case DType::kBFloat16: {
      // Round to nearest even, as float_to_bfloat16_bits, written inline and branch-free so the
      // compiler vectorizes it (this loop runs over every weight of every adapter load).
      uint16_t* out = reinterpret_cast<uint16_t*>(row);
      uint32_t any_bad = 0;
      for (int64_t c = 0; c < n; ++c) {
        uint32_t x;
        const float v = values[c] * scale;
        std::memcpy(&x, &v, sizeof x);
        const uint32_t nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
        const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
        const uint16_t bits = static_cast<uint16_t>(nan ? ((x >> 16) | 0x40u) : rounded);
        out[c] = bits;
        any_bad |= static_cast<uint32_t>((bits & 0x7F80u) == 0x7F80u);  // Inf or NaN
      }
      if (any_bad != 0) {
        for (int64_t c = 0; c < n; ++c) {
          if ((out[c] & 0x7F80u) == 0x7F80u) return c;
        }
      }
    } break;
    default:
      for (int64_t c = 0; c < n; ++c) {
        store_from_float(row, dtype, c, values[c] * scale);
        if (bad < 0 && !std::isfinite(load_as_float(row, dtype, c))) bad = c;
      }
  }
  return bad;
}

// A view that walks down the columns of a 2-D [R, C] tensor (col_stride == C, its rows starting
// inside the first tensor row): PEFT's B of fused experts, read as B^T rows. Such views are read
// from a transposed float32 copy of the tensor, so each view row is contiguous; gathering them
// straight from the tensor touches one element per cache line.
bool walks_columns(const LoraMatrixSource& m, const SafetensorInfo& info) {
  if (info.shape.size() != 2 || m.col_stride != info.shape[1] || m.col_stride <= 1) return false;
  const int64_t first = m.offset, last = m.offset + (m.rows - 1) * m.row_stride;
  return m.row_stride >= 0 && first >= 0 && last < info.shape[1] && m.cols <= info.shape[0];
}

// out[b * R + a] = float(src[a * C + b]) for a [R, C] tensor, in 32 x 32 tiles.
void transpose_to_float(const std::byte* src, DType dtype, int64_t rows, int64_t cols,
                        std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows * cols));
  constexpr int64_t kTile = 32;
  float tile[kTile];
  for (int64_t a0 = 0; a0 < rows; a0 += kTile) {
    for (int64_t b0 = 0; b0 < cols; b0 += kTile) {
      const int64_t a1 = std::min(rows, a0 + kTile), b1 = std::min(cols, b0 + kTile);
      for (int64_t a = a0; a < a1; ++a) {
        row_to_float(src, dtype, a * cols + b0, 1, b1 - b0, tile);
        for (int64_t b = b0; b < b1; ++b) out[static_cast<size_t>(b * rows + a)] = tile[b - b0];
      }
    }
  }
}

FileStamp stamp_of(const struct stat& st) {
  return {static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
          static_cast<uint64_t>(st.st_ino)};
}

// A load reads the files registration validated: one that is gone, or was rewritten, shrunk or
// replaced since, fails the load with what happened (the header offsets no longer hold).
void check_files_unchanged(const AdapterEntry& entry) {
  for (size_t i = 0; i < entry.files.size(); ++i) {
    const std::string& path = entry.files[i].path();
    const std::string name = base_name(path);
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      throw AdapterError(entry.name, "file '" + name + "' is gone since the adapter was "
                                         "registered (" + std::strerror(errno) +
                                         "); reload the adapter");
    }
    const FileStamp now = stamp_of(st);
    const FileStamp& then = entry.file_stamps[i];
    if (now.size < then.size) {
      throw AdapterError(entry.name, "file '" + name + "' was truncated since the adapter was "
                                         "registered (" + std::to_string(now.size) +
                                         " bytes, was " + std::to_string(then.size) +
                                         "); reload the adapter");
    }
    if (now.size != then.size || now.mtime_ns != then.mtime_ns || now.inode != then.inode) {
      throw AdapterError(entry.name, "file '" + name +
                                         "' changed since the adapter was registered; reload "
                                         "the adapter");
    }
  }
}

}  // namespace

std::string base_name(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string cut_directories(std::string message, const std::vector<std::string>& files) {
  for (const std::string& path : files) {
    if (path.find('/') == std::string::npos) continue;
    const std::string name = base_name(path);
    for (size_t at = message.find(path); at != std::string::npos;
         at = message.find(path, at + name.size())) {
      message.replace(at, path.size(), name);
    }
  }
  return message;
}

std::string failure_message(const std::string& adapter, const std::string& what,
                            const std::vector<std::string>& files) {
  std::string problem = what;
  const std::string prefix = "adapter '" + adapter + "': ";
  while (problem.compare(0, prefix.size(), prefix) == 0) problem.erase(0, prefix.size());
  return prefix + cut_directories(problem, files);
}

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
      fail(cut_directories(e.what(), spec.files));
    }
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      fail("file '" + base_name(path) + "' vanished during registration");
    }
    entry->file_stamps.push_back(stamp_of(st));
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
      fail(what + ": tensor '" + m.tensor + "' not found in '" + base_name(file.path()) + "'");
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

namespace {

// Packs matrices order[begin, end) (whole source-tensor groups) into their rows of `buffer`:
// each tensor is read once over the union of its views' extents (fused-expert tensors hold
// every expert, and a B view, rank-major columns, spans nearly all of its tensor, so reading
// per view would read the tensor once per expert).
void pack_tensor_groups(const AdapterEntry& entry, DType dtype, const std::vector<size_t>& order,
                        size_t begin, size_t end, HostBuffer& buffer) {
  const AdapterRowLayout& layout = *entry.layout;
  const auto& matrices = entry.spec.matrices;
  std::vector<std::byte> scratch;  // [group_lo, group_hi] of the current tensor
  int64_t group_lo = 0;
  std::vector<float> transposed;  // the current tensor, transposed, when its views walk columns
  bool group_transposed = false;
  std::vector<float> values;  // one source row as float32
  for (size_t at = begin; at < end; ++at) {
    const size_t i = order[at];
    const LoraMatrixSource& m = matrices[i];
    const SafetensorInfo& info = entry.matrix_tensors[i];
    const SafetensorsFile& file = entry.files[m.file];
    const int64_t elem = static_cast<int64_t>(dtype_size(info.dtype));
    const bool first_of_tensor = at == begin || matrices[order[at - 1]].file != m.file ||
                                 matrices[order[at - 1]].tensor != m.tensor;
    if (first_of_tensor) {
      auto [lo, hi] = view_extent(m);
      group_transposed = walks_columns(m, info);
      for (size_t j = at + 1; j < end && matrices[order[j]].file == m.file &&
                              matrices[order[j]].tensor == m.tensor;
           ++j) {
        auto [l, h] = view_extent(matrices[order[j]]);
        lo = std::min(lo, l);
        hi = std::max(hi, h);
        group_transposed = group_transposed && walks_columns(matrices[order[j]], info);
      }
      if (group_transposed) {  // the whole tensor
        lo = 0;
        hi = info.numel() - 1;
      }
      group_lo = lo;
      scratch.resize(static_cast<size_t>((hi - lo + 1) * elem));
      try {
        file.read_tensor_bytes(info, lo * elem, (hi - lo + 1) * elem, scratch.data());
      } catch (const Error& e) {
        throw AdapterError(entry.name, e.what());  // the paths are cut by failure_message
      }
      if (group_transposed) {
        transpose_to_float(scratch.data(), info.dtype, info.shape[0], info.shape[1], transposed);
      }
    }
    const int64_t lo = group_lo;
    const float scale = m.is_b ? m.scale : 1.0f;
    values.resize(static_cast<size_t>(m.cols));
    for (int64_t r = 0; r < m.rows; ++r) {
      std::byte* row = buffer.data() + layout.row_offset(m.site, m.layer, m.expert, m.is_b,
                                                         static_cast<int>(r));
      const float* source_row = values.data();
      if (group_transposed) {  // column (offset + r * row_stride) of the tensor, contiguous
        source_row = transposed.data() + (m.offset + r * m.row_stride) * info.shape[0];
      } else {
        row_to_float(scratch.data(), info.dtype, m.offset + r * m.row_stride - lo, m.col_stride,
                     m.cols, values.data());
      }
      const int64_t c = float_to_row(source_row, scale, dtype, row, m.cols);
      if (c >= 0) {
        const float source = source_row[c];
        const std::string value = std::isnan(source)   ? std::string("NaN")
                                  : std::isinf(source) ? std::string("Inf")
                                                       : "a value that overflows " +
                                                             std::string(dtype_name(dtype));
        throw AdapterError(entry.name, "tensor '" + m.tensor + "' holds " + value + " (at [" +
                                           std::to_string(r) + ", " + std::to_string(c) +
                                           "] of " + matrix_name(m) + ", file '" +
                                           base_name(file.path()) + "')");
      }
    }
  }
}

// Cuts the sorted matrices into at most `parts` contiguous runs of whole tensor groups with
// about equal elements each; returns the run boundaries (first 0, last order.size()).
std::vector<size_t> split_tensor_groups(const AdapterEntry& entry,
                                        const std::vector<size_t>& order, int parts) {
  const auto& matrices = entry.spec.matrices;
  int64_t total = 0;
  for (size_t i : order) total += matrices[i].rows * matrices[i].cols;
  std::vector<size_t> bounds = {0};
  int64_t done = 0;
  for (size_t at = 0; at < order.size(); ++at) {
    const LoraMatrixSource& m = matrices[order[at]];
    const bool starts_group = at > 0 && (matrices[order[at - 1]].file != m.file ||
                                         matrices[order[at - 1]].tensor != m.tensor);
    const int64_t share = total * static_cast<int64_t>(bounds.size()) / parts;
    if (starts_group && static_cast<int>(bounds.size()) < parts && done >= share) {
      bounds.push_back(at);
    }
    done += m.rows * m.cols;
  }
  bounds.push_back(order.size());
  return bounds;
}

}  // namespace

HostBuffer pack_adapter_rows(const AdapterEntry& entry, DType dtype, int threads) {
  check_files_unchanged(entry);
  const AdapterRowLayout& layout = *entry.layout;
  HostBuffer buffer(layout.num_pages() * layout.page_bytes());
  std::memset(buffer.data(), 0, static_cast<size_t>(buffer.bytes()));  // zero the row tails
  // Matrices grouped by source tensor (each group is read once, by one thread).
  const auto& matrices = entry.spec.matrices;
  std::vector<size_t> order(matrices.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::tie(matrices[a].file, matrices[a].tensor) <
           std::tie(matrices[b].file, matrices[b].tensor);
  });
  const std::vector<size_t> bounds = split_tensor_groups(entry, order, std::max(1, threads));
  const size_t parts = bounds.size() - 1;
  // Runs write disjoint rows. The first failing run (in matrix order) reports its error.
  std::vector<std::exception_ptr> errors(parts);
  auto run = [&](size_t part) {
    try {
      pack_tensor_groups(entry, dtype, order, bounds[part], bounds[part + 1], buffer);
    } catch (...) {
      errors[part] = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  for (size_t part = 1; part < parts; ++part) {
    try {
      helpers.emplace_back(run, part);
    } catch (const std::system_error&) {  // no thread to be had: pack this run here
      run(part);
    }
  }
  run(0);
  for (std::thread& helper : helpers) helper.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return buffer;
}

}  // namespace moelora::detail
