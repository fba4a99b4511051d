// Row placement of LoRA adapters in pages, and the index arithmetic of the shared row table.
#include "moelora/row_layout.h"

#include <algorithm>
#include <string>
#include <unordered_set>

#include "moelora/error.h"

namespace moelora {
namespace {

constexpr int64_t kRowAlignment = 16;  // kernels read rows with 16-byte vector loads

void check_sites(const std::vector<LoraSite>& sites, const char* what) {
  std::unordered_set<std::string> names;
  for (const LoraSite& site : sites) {
    const std::string prefix = std::string(what) + ": site '" + site.name + "' ";
    if (site.num_layers < 0) throw InvalidArgument(prefix + "has negative num_layers");
    if (site.num_experts < 1) throw InvalidArgument(prefix + "needs num_experts >= 1");
    if (site.in_dim <= 0 || site.out_dim <= 0) {
      throw InvalidArgument(prefix + "needs positive in_dim and out_dim, got " +
                            std::to_string(site.in_dim) + " and " + std::to_string(site.out_dim));
    }
    if (!names.insert(site.name).second) {
      throw InvalidArgument(std::string(what) + ": site name '" + site.name + "' appears twice");
    }
  }
}

void check_max_rank(int32_t max_rank, const char* what) {
  if (max_rank <= 0) {
    throw InvalidArgument(std::string(what) + ": max_rank must be positive, got " +
                          std::to_string(max_rank));
  }
}

// A shared A must come from an earlier site (its rows are placed first) of the same in_dim and
// experts with the same rank at that layer.
void check_shared_a(const std::vector<LoraSite>& sites, const SiteRanks& ranks,
                    const SharedARows& shared_a) {
  if (shared_a.empty()) return;
  const std::string what = "AdapterRowLayout: shared_a ";
  if (shared_a.size() != sites.size()) {
    throw InvalidArgument(what + "has " + std::to_string(shared_a.size()) + " sites, expected " +
                          std::to_string(sites.size()));
  }
  for (size_t s = 0; s < sites.size(); ++s) {
    if (static_cast<int64_t>(shared_a[s].size()) != sites[s].num_layers) {
      throw InvalidArgument(what + "of site '" + sites[s].name + "' has " +
                            std::to_string(shared_a[s].size()) + " layers, expected " +
                            std::to_string(sites[s].num_layers));
    }
    for (int32_t l = 0; l < sites[s].num_layers; ++l) {
      const int32_t t = shared_a[s][l];
      if (t < 0) continue;
      if (t >= static_cast<int32_t>(s) || sites[t].in_dim != sites[s].in_dim ||
          sites[t].num_experts != sites[s].num_experts || l >= sites[t].num_layers ||
          l >= static_cast<int32_t>(ranks[t].size()) ||
          l >= static_cast<int32_t>(ranks[s].size()) || ranks[t][l] != ranks[s][l]) {
        throw InvalidArgument(what + "of site '" + sites[s].name + "' layer " +
                              std::to_string(l) + " names site " + std::to_string(t) +
                              ", which is not an earlier site of the same in_dim, experts and "
                              "rank");
      }
    }
  }
}

}  // namespace

int64_t lora_row_bytes(int64_t dim, DType dtype) {
  if (dim <= 0) throw InvalidArgument("lora_row_bytes: dim must be positive, got " +
                                      std::to_string(dim));
  const int64_t bytes = dim * static_cast<int64_t>(dtype_size(dtype));
  return (bytes + kRowAlignment - 1) / kRowAlignment * kRowAlignment;
}

AdapterRowLayout::AdapterRowLayout(const std::vector<LoraSite>& sites, const SiteRanks& ranks,
                                   DType dtype, int64_t page_bytes, int32_t max_rank,
                                   const SharedARows& shared_a)
    : sites_(sites), ranks_(ranks), shared_a_(shared_a), dtype_(dtype), page_bytes_(page_bytes) {
  const char* what = "AdapterRowLayout";
  check_sites(sites, what);
  check_max_rank(max_rank, what);
  if (page_bytes <= 0 || page_bytes % kRowAlignment != 0) {
    throw InvalidArgument("AdapterRowLayout: page_bytes must be a positive multiple of 16, got " +
                          std::to_string(page_bytes));
  }
  if (ranks.size() != sites.size()) {
    throw InvalidArgument("AdapterRowLayout: ranks has " + std::to_string(ranks.size()) +
                          " sites, expected " + std::to_string(sites.size()));
  }
  check_shared_a(sites, ranks, shared_a);
  int64_t cursor = 0;  // next free byte of the packed buffer
  auto place_row = [&](int64_t row_bytes) {
    if (cursor % page_bytes + row_bytes > page_bytes) {
      cursor = (cursor / page_bytes + 1) * page_bytes;  // never straddle a page
    }
    const int64_t offset = cursor;
    cursor += row_bytes;
    used_bytes_ += row_bytes;
    return offset;
  };
  row_offsets_.resize(sites.size());
  for (size_t s = 0; s < sites.size(); ++s) {
    const LoraSite& site = sites[s];
    if (static_cast<int64_t>(ranks[s].size()) != site.num_layers) {
      throw InvalidArgument("AdapterRowLayout: site '" + site.name + "' has " +
                            std::to_string(ranks[s].size()) + " layer ranks, expected " +
                            std::to_string(site.num_layers));
    }
    const int64_t a_bytes = lora_row_bytes(site.in_dim, dtype);
    const int64_t b_bytes = lora_row_bytes(site.out_dim, dtype);
    row_offsets_[s].resize(static_cast<size_t>(site.num_layers));
    for (int32_t layer = 0; layer < site.num_layers; ++layer) {
      const int32_t rank = ranks[s][layer];
      if (rank < 0 || rank > max_rank) {
        throw InvalidArgument("AdapterRowLayout: site '" + site.name + "' layer " +
                              std::to_string(layer) + " has rank " + std::to_string(rank) +
                              ", outside [0, max_rank=" + std::to_string(max_rank) + "]");
      }
      if (rank == 0) continue;
      if (a_bytes > page_bytes || b_bytes > page_bytes) {
        throw InvalidArgument("AdapterRowLayout: a row of site '" + site.name + "' (" +
                              std::to_string(std::max(a_bytes, b_bytes)) +
                              " bytes) does not fit in a page of " + std::to_string(page_bytes) +
                              " bytes");
      }
      const int32_t a_source = shares_a(static_cast<int>(s), layer) ? shared_a[s][layer] : -1;
      std::vector<int64_t>& offsets = row_offsets_[s][layer];
      offsets.reserve(static_cast<size_t>(site.num_experts) * 2 * rank);
      for (int32_t expert = 0; expert < site.num_experts; ++expert) {
        for (int32_t row = 0; row < rank; ++row) {
          offsets.push_back(a_source >= 0 ? row_offset(a_source, layer, expert, false, row)
                                          : place_row(a_bytes));
        }
        for (int32_t row = 0; row < rank; ++row) offsets.push_back(place_row(b_bytes));
      }
    }
  }
  num_pages_ = (cursor + page_bytes - 1) / page_bytes;
}

int64_t AdapterRowLayout::row_offset(int site, int layer, int expert, bool is_b, int row) const {
  if (site < 0 || site >= static_cast<int>(sites_.size())) {
    throw InvalidArgument("row_offset: site " + std::to_string(site) + " out of range");
  }
  const LoraSite& info = sites_[site];
  if (layer < 0 || layer >= info.num_layers) {
    throw InvalidArgument("row_offset: layer " + std::to_string(layer) + " of site '" +
                          info.name + "' out of range");
  }
  if (expert < 0 || expert >= info.num_experts) {
    throw InvalidArgument("row_offset: expert " + std::to_string(expert) + " of site '" +
                          info.name + "' out of range");
  }
  const int32_t rank = ranks_[site][layer];
  if (row < 0 || row >= rank) {
    throw InvalidArgument("row_offset: row " + std::to_string(row) + " of site '" + info.name +
                          "' layer " + std::to_string(layer) + " is outside its rank " +
                          std::to_string(rank));
  }
  const size_t index = (static_cast<size_t>(expert) * 2 + (is_b ? 1 : 0)) * rank + row;
  return row_offsets_[site][layer][index];
}

RowTableLayout::RowTableLayout(const std::vector<LoraSite>& sites, int32_t max_rank)
    : sites_(sites), max_rank_(max_rank) {
  check_sites(sites, "RowTableLayout");
  check_max_rank(max_rank, "RowTableLayout");
  for (const LoraSite& site : sites) {
    site_row_base_.push_back(entries_per_slot_);
    site_rank_base_.push_back(rank_entries_per_slot_);
    entries_per_slot_ += static_cast<int64_t>(site.num_layers) * site.num_experts * 2 * max_rank;
    rank_entries_per_slot_ += site.num_layers;
  }
}

int64_t RowTableLayout::row_base(int site, int layer) const {
  if (site < 0 || site >= static_cast<int>(sites_.size())) {
    throw InvalidArgument("row table: site " + std::to_string(site) + " out of range");
  }
  if (layer < 0 || layer >= sites_[site].num_layers) {
    throw InvalidArgument("row table: layer " + std::to_string(layer) + " of site '" +
                          sites_[site].name + "' out of range");
  }
  return site_row_base_[site] +
         static_cast<int64_t>(layer) * sites_[site].num_experts * 2 * max_rank_;
}

int64_t RowTableLayout::row_index(int site, int layer, int expert, bool is_b, int row) const {
  const int64_t base = row_base(site, layer);
  if (expert < 0 || expert >= sites_[site].num_experts) {
    throw InvalidArgument("row table: expert " + std::to_string(expert) + " of site '" +
                          sites_[site].name + "' out of range");
  }
  if (row < 0 || row >= max_rank_) {
    throw InvalidArgument("row table: row " + std::to_string(row) + " outside max_rank " +
                          std::to_string(max_rank_));
  }
  return base + (static_cast<int64_t>(expert) * 2 + (is_b ? 1 : 0)) * max_rank_ + row;
}

int64_t RowTableLayout::rank_index(int site, int layer) const {
  row_base(site, layer);  // range checks
  return site_rank_base_[site] + layer;
}

int RowTableLayout::site_index(const std::string& name) const {
  for (size_t s = 0; s < sites_.size(); ++s) {
    if (sites_[s].name == name) return static_cast<int>(s);
  }
  throw NotFound("row table: no LoRA site named '" + name + "'");
}

}  // namespace moelora
