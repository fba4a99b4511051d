// Where an adapter's LoRA rows live.
//
// A LoRA site is one adaptable linear map of the model (an attention projection, or one
// expert projection with num_experts copies), present in each of num_layers layers. An adapter
// stores, for each (site, layer, expert) it targets, A as rows [rank, in_dim] and B transposed
// as rows [rank, out_dim]. Rows are packed into pages in a fixed order (site, layer, expert,
// A rows then B rows); a row never straddles a page, and each row starts 16-byte aligned.
// So an adapter of rank r takes pages in proportion to r, whatever max_lora_rank is. Two sites
// fed by one saved A (a fused gate_up target: experts.gate and experts.up) keep one copy of its
// rows; the second site's row table points at the first's.
//
// Kernels find rows through a row table: for each slot (a device-resident adapter) the byte
// offset of every row from the arena's base. LoraSiteView is the slice of that table a kernel
// needs for one site at one layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "moelora/dtype.h"

namespace moelora {

struct LoraSite {
  std::string name;         // e.g. "q_proj", "experts.gate", "experts.down"
  int32_t num_layers = 0;
  int32_t num_experts = 1;  // 1 for dense projections
  int64_t in_dim = 0;
  int64_t out_dim = 0;
};

// ranks[site][layer]: an adapter's rank at each site and layer, 0 where it is not targeted.
using SiteRanks = std::vector<std::vector<int32_t>>;

// Row bytes rounded up to 16 so that every row starts 16-byte aligned.
int64_t lora_row_bytes(int64_t dim, DType dtype);

// shared_a[site][layer]: an earlier site whose A rows (site, layer) reuses, or -1. Empty: none.
using SharedARows = std::vector<std::vector<int32_t>>;

// The packed placement of one adapter's rows in its pages.
class AdapterRowLayout {
 public:
  // Throws InvalidArgument when ranks do not match the sites, a rank is negative or above
  // max_rank, a row does not fit in one page, or a shared A names a site that is not earlier
  // or differs in in_dim, experts or rank at that layer.
  AdapterRowLayout(const std::vector<LoraSite>& sites, const SiteRanks& ranks, DType dtype,
                   int64_t page_bytes, int32_t max_rank, const SharedARows& shared_a = {});

  int64_t num_pages() const { return num_pages_; }
  int64_t used_bytes() const { return used_bytes_; }  // row bytes, excluding page tails
  int64_t page_bytes() const { return page_bytes_; }
  DType dtype() const { return dtype_; }
  const SiteRanks& ranks() const { return ranks_; }
  int32_t rank(int site, int layer) const { return ranks_[site][layer]; }
  // Whether (site, layer) reuses another site's A rows (its A views need no copy of their own).
  bool shares_a(int site, int layer) const {
    return !shared_a_.empty() && shared_a_[site][layer] >= 0;
  }
  // Byte offset of a row inside the adapter's packed buffer (page i begins at i * page_bytes).
  int64_t row_offset(int site, int layer, int expert, bool is_b, int row) const;

 private:
  std::vector<LoraSite> sites_;
  SiteRanks ranks_;
  SharedARows shared_a_;
  DType dtype_;
  int64_t page_bytes_;
  // row_offsets_[site][layer][(expert * 2 + is_b) * rank + row]: byte offset of each row.
  std::vector<std::vector<std::vector<int64_t>>> row_offsets_;
  int64_t num_pages_ = 0;
  int64_t used_bytes_ = 0;
};

// Index arithmetic of the row table shared by every slot:
//   row_offsets: int64 [num_slots][entries_per_slot], entries of site s at layer l:
//                [num_experts][2 (A, B)][max_rank], starting at row_base(s, l)
//   ranks:       int32 [num_slots][rank_entries_per_slot], rank of site s at layer l at
//                rank_index(s, l); 0 = not targeted (kernels skip the slot).
// A row offset is in bytes from the arena's base.
class RowTableLayout {
 public:
  RowTableLayout(const std::vector<LoraSite>& sites, int32_t max_rank);
  int64_t entries_per_slot() const { return entries_per_slot_; }
  int64_t rank_entries_per_slot() const { return rank_entries_per_slot_; }
  int64_t row_base(int site, int layer) const;
  int64_t row_index(int site, int layer, int expert, bool is_b, int row) const;
  int64_t rank_index(int site, int layer) const;
  int32_t max_rank() const { return max_rank_; }
  const std::vector<LoraSite>& sites() const { return sites_; }
  int site_index(const std::string& name) const;  // throws NotFound

 private:
  std::vector<LoraSite> sites_;
  int32_t max_rank_;
  std::vector<int64_t> site_row_base_;
  std::vector<int64_t> site_rank_base_;
  int64_t entries_per_slot_ = 0;
  int64_t rank_entries_per_slot_ = 0;
};

// What a kernel reads to apply one site's LoRA at one layer, for every slot. Plain data so it
// can be passed by value to a CUDA kernel.
struct LoraSiteView {
  const std::byte* arena = nullptr;   // base of the pool's arena (device or host memory)
  const int64_t* row_offsets = nullptr;  // [num_slots][num_experts][2][max_rank], slot-strided
  int64_t slot_stride = 0;            // elements of row_offsets between consecutive slots
  const int32_t* ranks = nullptr;     // [num_slots], ranks[slot * rank_slot_stride]
  int64_t rank_slot_stride = 0;
  int32_t num_slots = 0;
  int32_t num_experts = 1;
  int32_t max_rank = 0;
  int64_t in_dim = 0;
  int64_t out_dim = 0;
  DType dtype = DType::kFloat32;      // the weights' dtype

  // Address of row `row` of A (is_b = false, in_dim elements) or of B^T (out_dim elements).
  const std::byte* row(int slot, int expert, bool is_b, int r) const {
    return arena + row_offsets[slot * slot_stride + (expert * 2 + (is_b ? 1 : 0)) * max_rank + r];
  }
  int32_t rank(int slot) const { return ranks[slot * rank_slot_stride]; }
};

}  // namespace moelora
