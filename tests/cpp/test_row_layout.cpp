// Tests of LoRA row placement in pages and of the row-table index arithmetic.
#include <algorithm>
#include <set>
#include <vector>

#include "moelora/error.h"
#include "moelora/row_layout.h"
#include "test_harness.h"

using namespace moelora;

namespace {

struct Placed {
  int64_t offset;
  int64_t bytes;
};

// Every placed row of a layout, read back through row_offset.
std::vector<Placed> all_rows(const AdapterRowLayout& layout, const std::vector<LoraSite>& sites) {
  std::vector<Placed> rows;
  for (int s = 0; s < static_cast<int>(sites.size()); ++s) {
    for (int l = 0; l < sites[s].num_layers; ++l) {
      for (int e = 0; e < sites[s].num_experts; ++e) {
        for (bool is_b : {false, true}) {
          const int64_t dim = is_b ? sites[s].out_dim : sites[s].in_dim;
          for (int r = 0; r < layout.rank(s, l); ++r) {
            rows.push_back(
                {layout.row_offset(s, l, e, is_b, r), lora_row_bytes(dim, layout.dtype())});
          }
        }
      }
    }
  }
  return rows;
}

SiteRanks uniform_ranks(const std::vector<LoraSite>& sites, int32_t rank) {
  SiteRanks ranks;
  for (const auto& site : sites) ranks.emplace_back(site.num_layers, rank);
  return ranks;
}

// Awkward sizes: hidden 111, an expert projection with 7 experts, a 1-layer site.
std::vector<LoraSite> awkward_sites() {
  return {{"q_proj", 3, 1, 111, 111},
          {"experts.gate_up", 3, 7, 111, 2 * 133},
          {"experts.down", 3, 7, 133, 111},
          {"o_proj", 1, 1, 111, 96}};
}

}  // namespace

TEST_CASE("lora_row_bytes rounds to 16 bytes") {
  CHECK_EQ(lora_row_bytes(1, DType::kBFloat16), 16);
  CHECK_EQ(lora_row_bytes(8, DType::kBFloat16), 16);
  CHECK_EQ(lora_row_bytes(9, DType::kBFloat16), 32);
  CHECK_EQ(lora_row_bytes(111, DType::kFloat32), 448);
  CHECK_EQ(lora_row_bytes(4096, DType::kFloat16), 8192);
  CHECK_THROWS_AS(lora_row_bytes(0, DType::kFloat16), InvalidArgument);
}

TEST_CASE("row layout: no row straddles a page, rows are aligned and disjoint") {
  const auto sites = awkward_sites();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (int64_t page_bytes : {1280, 1536, 4096, 65536}) {
      AdapterRowLayout layout(sites, uniform_ranks(sites, 5), dtype, page_bytes, 16);
      auto rows = all_rows(layout, sites);
      int64_t used = 0;
      for (const Placed& row : rows) {
        CHECK_EQ(row.offset % 16, 0);
        CHECK_EQ(row.offset / page_bytes, (row.offset + row.bytes - 1) / page_bytes);
        CHECK(row.offset + row.bytes <= layout.num_pages() * page_bytes);
        used += row.bytes;
      }
      CHECK_EQ(layout.used_bytes(), used);
      std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.offset < b.offset; });
      for (size_t i = 1; i < rows.size(); ++i) {
        CHECK(rows[i - 1].offset + rows[i - 1].bytes <= rows[i].offset);
      }
      // Packed: every page but the last is needed, and waste is under one row per page.
      CHECK(rows.back().offset >= (layout.num_pages() - 1) * page_bytes);
      CHECK(layout.num_pages() * page_bytes - used < layout.num_pages() * 2 * 448 + page_bytes);
    }
  }
}

TEST_CASE("row layout: packing order is site, layer, expert, A rows then B rows") {
  std::vector<LoraSite> sites = {{"experts.down", 2, 3, 64, 32}};  // bf16: A 128 B, B 64 B
  AdapterRowLayout layout(sites, {{2, 2}}, DType::kBFloat16, 256, 8);
  // Layer 0 expert 0: A0 @0, A1 @128, then B0 @256 (new page: 128+128 filled page 0).
  CHECK_EQ(layout.row_offset(0, 0, 0, false, 0), 0);
  CHECK_EQ(layout.row_offset(0, 0, 0, false, 1), 128);
  CHECK_EQ(layout.row_offset(0, 0, 0, true, 0), 256);
  CHECK_EQ(layout.row_offset(0, 0, 0, true, 1), 320);
  // Expert 1's first A row fits at 384 (128 bytes left in page 1).
  CHECK_EQ(layout.row_offset(0, 0, 1, false, 0), 384);
  CHECK_EQ(layout.row_offset(0, 0, 1, false, 1), 512);
  CHECK(layout.row_offset(0, 1, 0, false, 0) > layout.row_offset(0, 0, 2, true, 1));
  CHECK_EQ(layout.used_bytes(), 2 * 3 * (2 * 128 + 2 * 64));
}

TEST_CASE("row layout: pages proportional to the real rank, not max_rank") {
  std::vector<LoraSite> sites = {{"experts.gate_up", 4, 8, 1024, 2048},
                                 {"experts.down", 4, 8, 1024, 1024}};
  const int64_t page_bytes = 64 * 1024;
  AdapterRowLayout rank8(sites, uniform_ranks(sites, 8), DType::kBFloat16, page_bytes, 64);
  AdapterRowLayout rank64(sites, uniform_ranks(sites, 64), DType::kBFloat16, page_bytes, 64);
  const int64_t bytes8 = 4 * 8 * 8 * (2048 + 4096 + 2048 + 2048);
  CHECK_EQ(rank8.used_bytes(), bytes8);
  CHECK_EQ(rank64.used_bytes(), 8 * bytes8);
  CHECK_EQ(rank8.num_pages(), (bytes8 + page_bytes - 1) / page_bytes);
  CHECK_EQ(rank64.num_pages(), 8 * rank8.num_pages());
}

TEST_CASE("row layout: zero-rank sites and layers take nothing") {
  const auto sites = awkward_sites();
  SiteRanks ranks = uniform_ranks(sites, 0);
  AdapterRowLayout empty(sites, ranks, DType::kBFloat16, 4096, 16);
  CHECK_EQ(empty.num_pages(), 0);
  CHECK_EQ(empty.used_bytes(), 0);
  ranks[2][1] = 3;  // one layer of one site
  AdapterRowLayout one(sites, ranks, DType::kBFloat16, 4096, 16);
  CHECK_EQ(one.used_bytes(), 7 * 3 * (lora_row_bytes(133, DType::kBFloat16) +
                                      lora_row_bytes(111, DType::kBFloat16)));
  CHECK_EQ(one.row_offset(2, 1, 0, false, 0), 0);
  CHECK_THROWS_AS(one.row_offset(2, 0, 0, false, 0), InvalidArgument);  // rank 0 there
  CHECK_THROWS_AS(one.row_offset(2, 1, 0, false, 3), InvalidArgument);
  CHECK_THROWS_AS(one.row_offset(2, 1, 7, false, 0), InvalidArgument);
  CHECK_THROWS_AS(one.row_offset(4, 0, 0, false, 0), InvalidArgument);
  CHECK_THROWS_AS(one.row_offset(0, 3, 0, false, 0), InvalidArgument);
}

TEST_CASE("row layout: errors name what was wrong") {
  const auto sites = awkward_sites();
  auto ranks = uniform_ranks(sites, 4);
  CHECK_THROWS_AS(AdapterRowLayout(sites, ranks, DType::kBFloat16, 4096, 0), InvalidArgument);
  CHECK_THROWS_AS(AdapterRowLayout(sites, ranks, DType::kBFloat16, 100, 16), InvalidArgument);
  CHECK_THROWS_AS(AdapterRowLayout(sites, ranks, DType::kBFloat16, 256, 16),
                  InvalidArgument);  // a 272-byte row does not fit in 256
  auto bad = ranks;
  bad.pop_back();
  CHECK_THROWS_AS(AdapterRowLayout(sites, bad, DType::kBFloat16, 4096, 16), InvalidArgument);
  bad = ranks;
  bad[1].push_back(4);
  CHECK_THROWS_AS(AdapterRowLayout(sites, bad, DType::kBFloat16, 4096, 16), InvalidArgument);
  bad = ranks;
  bad[0][0] = 17;
  try {
    AdapterRowLayout(sites, bad, DType::kBFloat16, 4096, 16);
    CHECK(false);
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("q_proj") != std::string::npos);
  }
  bad[0][0] = -1;
  CHECK_THROWS_AS(AdapterRowLayout(sites, bad, DType::kBFloat16, 4096, 16), InvalidArgument);
  auto dup = sites;
  dup[1].name = "q_proj";
  CHECK_THROWS_AS(AdapterRowLayout(dup, ranks, DType::kBFloat16, 4096, 16), InvalidArgument);
  dup = sites;
  dup[1].num_experts = 0;
  CHECK_THROWS_AS(RowTableLayout(dup, 16), InvalidArgument);
}

TEST_CASE("row layout: a site sharing an earlier site's A reuses its rows, not its pages") {
  std::vector<LoraSite> sites = {{"q_proj", 2, 1, 111, 96},
                                 {"experts.gate", 2, 7, 111, 133},
                                 {"experts.up", 2, 7, 111, 133},
                                 {"experts.down", 2, 7, 133, 111}};
  const auto ranks = uniform_ranks(sites, 5);
  const SharedARows shared = {{-1, -1}, {-1, -1}, {1, -1}, {-1, -1}};  // up shares layer 0 only
  AdapterRowLayout plain(sites, ranks, DType::kBFloat16, 4096, 8);
  AdapterRowLayout fused(sites, ranks, DType::kBFloat16, 4096, 8, shared);
  CHECK(fused.shares_a(2, 0) && !fused.shares_a(2, 1) && !fused.shares_a(1, 0));
  CHECK(!plain.shares_a(2, 0));
  CHECK_EQ(plain.used_bytes() - fused.used_bytes(), 7 * 5 * lora_row_bytes(111, DType::kBFloat16));
  CHECK(fused.num_pages() < plain.num_pages());
  std::set<int64_t> b_rows;
  for (int e = 0; e < 7; ++e) {
    for (int r = 0; r < 5; ++r) {
      CHECK_EQ(fused.row_offset(2, 0, e, false, r), fused.row_offset(1, 0, e, false, r));
      CHECK(fused.row_offset(2, 1, e, false, r) != fused.row_offset(1, 1, e, false, r));
      CHECK(b_rows.insert(fused.row_offset(2, 0, e, true, r)).second);
      CHECK(b_rows.insert(fused.row_offset(1, 0, e, true, r)).second);
    }
  }
  // Only an earlier site of the same in_dim, experts and rank can lend its A rows.
  for (const SharedARows& bad : {SharedARows{{-1, -1}, {2, -1}, {-1, -1}, {-1, -1}},   // later
                                 SharedARows{{-1, -1}, {-1, -1}, {-1, -1}, {1, -1}},   // in_dim
                                 SharedARows{{-1, -1}, {-1, -1}, {0, -1}, {-1, -1}},   // experts
                                 SharedARows{{-1, -1}, {-1, -1}, {1, -1}},             // sites
                                 SharedARows{{-1, -1}, {-1, -1}, {1}, {-1, -1}}}) {    // layers
    CHECK_THROWS_AS(AdapterRowLayout(sites, ranks, DType::kBFloat16, 4096, 8, bad),
                    InvalidArgument);
  }
  auto uneven = ranks;
  uneven[2][0] = 4;
  CHECK_THROWS_AS(AdapterRowLayout(sites, uneven, DType::kBFloat16, 4096, 8, shared),
                  InvalidArgument);
}

TEST_CASE("row table: indices cover [0, entries_per_slot) exactly once") {
  const auto sites = awkward_sites();
  RowTableLayout table(sites, 6);
  std::set<int64_t> seen;
  std::set<int64_t> rank_seen;
  for (int s = 0; s < static_cast<int>(sites.size()); ++s) {
    for (int l = 0; l < sites[s].num_layers; ++l) {
      CHECK(rank_seen.insert(table.rank_index(s, l)).second);
      CHECK_EQ(table.row_index(s, l, 0, false, 0), table.row_base(s, l));
      for (int e = 0; e < sites[s].num_experts; ++e) {
        for (bool is_b : {false, true}) {
          for (int r = 0; r < 6; ++r) {
            const int64_t index = table.row_index(s, l, e, is_b, r);
            CHECK(index >= 0 && index < table.entries_per_slot());
            CHECK(seen.insert(index).second);
            // The LoraSiteView formula agrees with the table.
            CHECK_EQ(index, table.row_base(s, l) + (e * 2 + (is_b ? 1 : 0)) * 6 + r);
          }
        }
      }
    }
  }
  CHECK_EQ(static_cast<int64_t>(seen.size()), table.entries_per_slot());
  CHECK_EQ(static_cast<int64_t>(rank_seen.size()), table.rank_entries_per_slot());
  CHECK_EQ(table.rank_entries_per_slot(), 10);
  CHECK_EQ(table.site_index("experts.down"), 2);
  CHECK_THROWS_AS(table.site_index("v_proj"), NotFound);
  CHECK_THROWS_AS(table.row_index(0, 0, 1, false, 0), InvalidArgument);
  CHECK_THROWS_AS(table.row_index(0, 0, 0, false, 6), InvalidArgument);
  CHECK_THROWS_AS(table.row_base(0, 3), InvalidArgument);
  CHECK_THROWS_AS(table.rank_index(5, 0), InvalidArgument);
  CHECK_THROWS_AS(RowTableLayout(sites, 0), InvalidArgument);
}

MOELORA_TEST_MAIN()
