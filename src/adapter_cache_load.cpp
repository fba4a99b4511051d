// Adapter registration checks (headers only) and the messages of adapter failures.
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adapter_cache_internal.h"
#include "moelora/error.h"

namespace moelora::detail {

namespace {

bool supported_weight_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

bool same_view(const LoraMatrixSource& a, const LoraMatrixSource& b) {
  return a.file == b.file && a.tensor == b.tensor && a.offset == b.offset && a.rows == b.rows &&
         a.cols == b.cols && a.row_stride == b.row_stride && a.col_stride == b.col_stride &&
         a.scale == b.scale;
}

// (site, layer) pairs whose every expert's A view is an earlier site's at the same layer (a
// fused gate_up target feeds experts.gate and experts.up from one A): those keep one copy of
// the rows. Every targeted (site, layer, expert) has exactly one A view (checked before).
SharedARows shared_a_rows(const std::vector<LoraSite>& sites, const AdapterSpec& spec) {
  std::vector<std::vector<std::vector<const LoraMatrixSource*>>> a_views(sites.size());
  for (size_t s = 0; s < sites.size(); ++s) {
    a_views[s].assign(static_cast<size_t>(sites[s].num_layers),
                      std::vector<const LoraMatrixSource*>(sites[s].num_experts, nullptr));
  }
  for (const LoraMatrixSource& m : spec.matrices) {
    if (!m.is_b) a_views[m.site][m.layer][m.expert] = &m;
  }
  SharedARows shared(sites.size());
  bool any = false;
  for (size_t s = 0; s < sites.size(); ++s) {
    shared[s].assign(static_cast<size_t>(sites[s].num_layers), -1);
    for (int32_t l = 0; l < sites[s].num_layers; ++l) {
      if (spec.ranks[s][l] == 0) continue;
      for (size_t t = 0; t < s && shared[s][l] < 0; ++t) {
        if (sites[t].in_dim != sites[s].in_dim || sites[t].num_experts != sites[s].num_experts ||
            l >= sites[t].num_layers || spec.ranks[t][l] != spec.ranks[s][l]) {
          continue;
        }
        bool same = true;
        for (int32_t e = 0; e < sites[s].num_experts && same; ++e) {
          same = same_view(*a_views[s][l][e], *a_views[t][l][e]);
        }
        if (same) {
          shared[s][l] = static_cast<int32_t>(t);
          any = true;
        }
      }
    }
  }
  return any ? shared : SharedARows{};
}

// `given` with a source per (site, layer, expert, A or B): a source of several experts is the
// same view repeated (see LoraMatrixSource). The checks after this one are per expert.
AdapterSpec one_source_per_expert(const AdapterSpec& given, const std::vector<LoraSite>& sites) {
  AdapterSpec spec{given.name, given.files, given.ranks, {}};
  size_t count = 0;
  for (const LoraMatrixSource& m : given.matrices) {
    if (m.experts == 1) {
      ++count;
      continue;
    }
    const bool known_site = m.site >= 0 && m.site < static_cast<int32_t>(sites.size());
    if (m.experts < 1 || !known_site || m.expert < 0 ||
        m.expert > sites[m.site].num_experts - m.experts) {
      throw AdapterError(given.name,
                         matrix_name(m) + ": covers " + std::to_string(m.experts) +
                             " experts from expert " + std::to_string(m.expert) +
                             (known_site ? ", the site has " +
                                               std::to_string(sites[m.site].num_experts)
                                         : ", of no such site"));
    }
    count += static_cast<size_t>(m.experts);
  }
  spec.matrices.reserve(count);
  for (const LoraMatrixSource& m : given.matrices) {
    for (int32_t e = 0; e < m.experts; ++e) {
      LoraMatrixSource one = m;
      one.expert = m.expert + e;
      one.offset = m.offset + e * m.expert_stride;
      one.experts = 1;
      one.expert_stride = 0;
      spec.matrices.push_back(std::move(one));
    }
  }
  return spec;
}

}  // namespace

std::pair<int64_t, int64_t> view_extent(const LoraMatrixSource& m) {
  int64_t lo = m.offset, hi = m.offset;
  for (int64_t step : {(m.rows - 1) * m.row_stride, (m.cols - 1) * m.col_stride}) {
    if (step < 0) lo += step;
    else hi += step;
  }
  return {lo, hi};
}

std::string matrix_name(const LoraMatrixSource& m) {
  return "matrix (site " + std::to_string(m.site) + ", layer " + std::to_string(m.layer) +
         ", expert " + std::to_string(m.expert) + ", " + (m.is_b ? "B" : "A") + ")";
}

FileStamp stamp_of_stat(const void* stat_struct) {
  const auto& st = *static_cast<const struct stat*>(stat_struct);
  return {static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
          static_cast<uint64_t>(st.st_ino)};
}

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

std::shared_ptr<AdapterEntry> validate_adapter_spec(const AdapterSpec& given,
                                                    const AdapterCacheConfig& config,
                                                    int64_t page_bytes) {
  const std::string& name = given.name;
  auto fail = [&](const std::string& problem) -> void { throw AdapterError(name, problem); };
  if (name.empty()) throw AdapterError(name, "the adapter name is empty");
  const auto& sites = config.sites;
  auto entry = std::make_shared<AdapterEntry>();
  entry->spec = one_source_per_expert(given, sites);
  const AdapterSpec& spec = entry->spec;
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

  entry->name = name;
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
    entry->file_stamps.push_back(stamp_of_stat(&st));
  }

  // Which (site, layer, expert, A or B) has a source: one flag each, from first_flag[site].
  std::vector<size_t> first_flag(sites.size() + 1, 0);
  for (size_t s = 0; s < sites.size(); ++s) {
    first_flag[s + 1] = first_flag[s] + static_cast<size_t>(sites[s].num_layers) *
                                            static_cast<size_t>(sites[s].num_experts) * 2;
  }
  std::vector<char> covered(first_flag.back(), 0);
  auto flag = [&](size_t s, int32_t layer, int32_t expert, bool is_b) -> char& {
    return covered[first_flag[s] +
                   (static_cast<size_t>(layer) * static_cast<size_t>(sites[s].num_experts) +
                    static_cast<size_t>(expert)) * 2 + (is_b ? 1 : 0)];
  };
  // The experts of a fused tensor are consecutive sources of one tensor: its header entry is
  // looked up once for all of them.
  const SafetensorInfo* last_info = nullptr;
  const LoraMatrixSource* last_source = nullptr;
  for (const LoraMatrixSource& m : spec.matrices) {
    // The name is made only for a message: thousands of sources pass.
    auto what = [&m] { return matrix_name(m); };
    if (m.site < 0 || m.site >= static_cast<int32_t>(sites.size())) {
      fail(what() + ": no such site");
    }
    const LoraSite& site = sites[m.site];
    if (m.layer < 0 || m.layer >= site.num_layers) fail(what() + ": no such layer");
    if (m.expert < 0 || m.expert >= site.num_experts) fail(what() + ": no such expert");
    const int32_t rank = spec.ranks[m.site][m.layer];
    if (rank == 0) fail(what() + ": site '" + site.name + "' is not targeted at this layer");
    char& seen = flag(static_cast<size_t>(m.site), m.layer, m.expert, m.is_b);
    if (seen) fail(what() + ": given more than once");
    seen = 1;
    if (m.file < 0 || m.file >= static_cast<int32_t>(entry->files.size())) {
      fail(what() + ": file index " + std::to_string(m.file) + " out of range");
    }
    const SafetensorsFile& file = entry->files[m.file];
    if (last_source == nullptr || last_source->file != m.file || last_source->tensor != m.tensor) {
      if (!file.contains(m.tensor)) {
        fail(what() + ": tensor '" + m.tensor + "' not found in '" + base_name(file.path()) + "'");
      }
      last_info = &file.tensor(m.tensor);
      last_source = &m;
    }
    const SafetensorInfo& info = *last_info;
    if (!supported_weight_dtype(info.dtype)) {
      fail(what() + ": tensor '" + m.tensor + "' has unsupported dtype " + dtype_name(info.dtype));
    }
    const int64_t expected_cols = m.is_b ? site.out_dim : site.in_dim;
    if (m.rows != rank) {
      fail(what() + ": view has " + std::to_string(m.rows) + " rows but the rank is " +
           std::to_string(rank));
    }
    if (m.cols != expected_cols) {
      fail(what() + ": view has " + std::to_string(m.cols) + " columns, expected " +
           std::to_string(expected_cols) + (m.is_b ? " (out_dim)" : " (in_dim)"));
    }
    auto [lo, hi] = view_extent(m);
    if (lo < 0 || hi >= info.numel()) {
      fail(what() + ": strided view of tensor '" + m.tensor + "' (offset " +
           std::to_string(m.offset) + ", strides " + std::to_string(m.row_stride) + ", " +
           std::to_string(m.col_stride) + ") reaches elements [" + std::to_string(lo) + ", " +
           std::to_string(hi) + "] outside its " + std::to_string(info.numel()) + " elements");
    }
    if (!std::isfinite(m.scale)) fail(what() + ": scale is not finite");
  }
  for (size_t s = 0; s < sites.size(); ++s) {
    for (int32_t l = 0; l < sites[s].num_layers; ++l) {
      if (spec.ranks[s][l] == 0) continue;
      for (int32_t e = 0; e < sites[s].num_experts; ++e) {
        for (bool is_b : {false, true}) {
          if (!flag(s, l, e, is_b)) {
            fail("no source for site '" + sites[s].name + "' layer " + std::to_string(l) +
                 " expert " + std::to_string(e) + (is_b ? " B" : " A"));
          }
        }
      }
    }
  }
  try {
    entry->layout = std::make_unique<AdapterRowLayout>(sites, spec.ranks, config.dtype,
                                                       page_bytes, config.max_lora_rank,
                                                       shared_a_rows(sites, spec));
  } catch (const InvalidArgument& e) {
    fail(e.what());
  }
  return entry;
}

}  // namespace moelora::detail
