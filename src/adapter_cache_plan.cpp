// The read plan of a disk -> host load: which bytes of which file each pread fetches, and which
// tensor elements each chunk holds. Chunks are what the reader threads share out, so they are
// the unit of both parallelism and cache residency: large enough for the storage's rate, small
// enough to stay in a core's cache while they are converted.
#include <algorithm>
#include <limits>
#include <map>
#include <tuple>

#include "adapter_cache_internal.h"
#include "moelora/error.h"

namespace moelora::detail {

namespace {

// Holes between the spans of one file up to this size are read through: cheaper than a pread.
constexpr int64_t kHoleReadThrough = int64_t{64} << 10;

// Whether view `m` walks columns of the group's [numel / C, C] view (see TensorGroup), and its
// column step.
bool view_walks_columns(const LoraMatrixSource& m, int64_t row_elems, int64_t rows_total,
                        int64_t* step) {
  const int64_t c = row_elems;
  if (c <= 1 || m.col_stride < c || m.col_stride % c != 0 || m.row_stride < 0) return false;
  if (m.offset < 0) return false;
  const int64_t first_row = m.offset / c, first_col = m.offset % c;
  *step = m.col_stride / c;
  return first_col + (m.rows - 1) * m.row_stride < c &&
         first_row + (m.cols - 1) * *step < rows_total;
}

TensorGroup make_group(const AdapterEntry& entry, int32_t file, const std::string& tensor,
                       const std::vector<int32_t>& matrices, int64_t chunk_bytes) {
  TensorGroup g;
  g.file = file;
  g.info = entry.files[file].tensor(tensor);
  g.elem_bytes = static_cast<int64_t>(dtype_size(g.info.dtype));
  g.row_elems = g.info.shape.empty() || g.info.shape.back() < 1 ? 1 : g.info.shape.back();
  g.matrices = matrices;
  const int64_t rows_total = g.info.numel() / g.row_elems;
  int64_t lo = g.info.numel(), hi = -1;
  bool columns = g.row_elems * g.elem_bytes <= chunk_bytes;
  int64_t step = 0;
  for (int32_t i : matrices) {
    const LoraMatrixSource& m = entry.spec.matrices[i];
    auto [l, h] = view_extent(m);
    lo = std::min(lo, l);
    hi = std::max(hi, h);
    int64_t s = 0;
    columns = columns && view_walks_columns(m, g.row_elems, rows_total, &s) &&
              (step == 0 || s == step);
    step = s;
  }
  g.walks_columns = columns;
  g.column_step = columns ? step : 1;
  if (columns) {  // whole rows: a chunk holds whole rows of the group, which are transposed
    lo = lo / g.row_elems * g.row_elems;
    hi = (hi / g.row_elems + 1) * g.row_elems - 1;
  }
  g.first_elem = lo;
  g.end_elem = hi + 1;
  return g;
}

struct Span {
  int64_t begin = 0;  // file bytes [begin, end)
  int64_t end = 0;
  int32_t group = 0;
  int64_t unit = 1;   // a cut inside the span must fall on a multiple of this from its begin
};

// The first allowed cut at or before `target` inside `span`, or, when that is not after
// `floor`, the first one after `target`.
int64_t cut_in_span(const Span& span, int64_t target, int64_t floor) {
  const int64_t units = (target - span.begin) / span.unit;
  int64_t cut = span.begin + units * span.unit;
  if (cut <= floor) cut = span.begin + (units + 1) * span.unit;
  return std::min(cut, span.end);
}

// Cuts one run of spans (holes between them short) into chunks.
void cut_run(const std::vector<Span>& spans, size_t first, size_t last, int32_t file,
             const std::vector<TensorGroup>& groups, int64_t chunk_bytes, ReadPlan& plan) {
  const int64_t run_end = spans[last - 1].end;
  int64_t cursor = spans[first].begin;
  size_t at = first;  // first span that may overlap the next chunk
  while (cursor < run_end) {
    int64_t cut = std::min(run_end, (cursor / chunk_bytes + 1) * chunk_bytes);
    for (size_t i = at; i < last && spans[i].begin < cut; ++i) {
      if (spans[i].begin < cut && cut < spans[i].end) cut = cut_in_span(spans[i], cut, cursor);
    }
    ReadChunk chunk;
    chunk.file = file;
    chunk.offset = cursor;
    chunk.bytes = cut - cursor;
    for (size_t i = at; i < last && spans[i].begin < cut; ++i) {
      const Span& s = spans[i];
      const int64_t begin = std::max(cursor, s.begin), end = std::min(cut, s.end);
      if (begin >= end) continue;
      const TensorGroup& g = groups[s.group];
      const int64_t base = g.info.data_offset;
      chunk.pieces.push_back({s.group, (begin - base) / g.elem_bytes, (end - base) / g.elem_bytes,
                              begin - cursor});
    }
    while (at < last && spans[at].end <= cut) ++at;
    plan.largest_chunk = std::max(plan.largest_chunk, chunk.bytes);
    plan.read_bytes += chunk.bytes;
    plan.chunks.push_back(std::move(chunk));
    cursor = cut;
  }
}

// The padding at the end of each row (rows start 16-byte aligned; vector loads of a row's last
// elements read it, so it must be zero). Page tails after a page's last row are never read.
std::vector<ByteRange> row_padding(const AdapterEntry& entry, DType model_dtype) {
  const AdapterRowLayout& layout = *entry.layout;
  const int64_t elem = static_cast<int64_t>(dtype_size(model_dtype));
  std::vector<ByteRange> pads;
  for (const LoraMatrixSource& m : entry.spec.matrices) {
    if (!m.is_b && layout.shares_a(m.site, m.layer)) continue;  // the source's rows
    const int64_t data = m.cols * elem;
    const int64_t pad = lora_row_bytes(m.cols, model_dtype) - data;
    if (pad == 0) continue;
    for (int64_t r = 0; r < m.rows; ++r) {
      pads.push_back(
          {layout.row_offset(m.site, m.layer, m.expert, m.is_b, static_cast<int>(r)) + data,
           pad});
    }
  }
  return pads;
}

}  // namespace

ReadPlan build_read_plan(const AdapterEntry& entry, DType model_dtype, int64_t chunk_bytes) {
  ReadPlan plan;
  std::map<std::tuple<int32_t, std::string>, std::vector<int32_t>> by_tensor;
  const auto& matrices = entry.spec.matrices;
  for (size_t i = 0; i < matrices.size(); ++i) {
    const LoraMatrixSource& m = matrices[i];
    // An A view another site's rows already hold is written once, through that site.
    if (!m.is_b && entry.layout->shares_a(m.site, m.layer)) continue;
    by_tensor[{m.file, m.tensor}].push_back(static_cast<int32_t>(i));
  }
  std::map<int32_t, std::vector<Span>> spans_of_file;
  for (const auto& [key, members] : by_tensor) {
    const int32_t file = std::get<0>(key);
    TensorGroup g = make_group(entry, file, std::get<1>(key), members, chunk_bytes);
    const int64_t row_bytes = g.row_elems * g.elem_bytes;
    const int64_t unit = row_bytes <= chunk_bytes ? row_bytes : g.elem_bytes;
    const int64_t base = g.info.data_offset;
    // A cut on a row boundary of the tensor, measured from the tensor's first element.
    Span span{base + g.first_elem * g.elem_bytes, base + g.end_elem * g.elem_bytes,
              static_cast<int32_t>(plan.groups.size()), unit};
    if (g.first_elem % g.row_elems != 0) span.unit = g.elem_bytes;  // starts mid-row
    spans_of_file[file].push_back(span);
    plan.groups.push_back(std::move(g));
  }
  for (auto& [file, spans] : spans_of_file) {
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
    size_t first = 0;
    for (size_t i = 1; i <= spans.size(); ++i) {
      if (i == spans.size() || spans[i].begin - spans[i - 1].end > kHoleReadThrough) {
        cut_run(spans, first, i, file, plan.groups, chunk_bytes, plan);
        first = i;
      }
    }
  }
  plan.row_padding = row_padding(entry, model_dtype);
  return plan;
}

std::vector<std::vector<int32_t>> chunk_host_blocks(const AdapterEntry& entry,
                                                    const ReadPlan& plan, DType model_dtype,
                                                    int64_t block_bytes) {
  const AdapterRowLayout& layout = *entry.layout;
  const auto& matrices = entry.spec.matrices;
  // The host bytes [first, end) of each matrix's rows (consecutive, but for page tails).
  std::vector<std::pair<int64_t, int64_t>> rows_of(matrices.size(), {0, 0});
  for (size_t i = 0; i < matrices.size(); ++i) {
    const LoraMatrixSource& m = matrices[i];
    if (m.rows <= 0) continue;
    const int64_t row_bytes = lora_row_bytes(m.cols, model_dtype);
    int64_t first = std::numeric_limits<int64_t>::max(), end = 0;
    for (int64_t r = 0; r < m.rows; ++r) {  // a registered spec has one source per expert
      const int64_t at = layout.row_offset(m.site, m.layer, m.expert, m.is_b, static_cast<int>(r));
      first = std::min(first, at);
      end = std::max(end, at + row_bytes);
    }
    rows_of[i] = {first, end};
  }
  std::vector<std::vector<int32_t>> blocks(plan.chunks.size());
  for (size_t c = 0; c < plan.chunks.size(); ++c) {
    std::vector<int32_t>& out = blocks[c];
    for (const ChunkPiece& piece : plan.chunks[c].pieces) {
      for (int32_t i : plan.groups[piece.group].matrices) {
        const auto [lo, hi] = view_extent(matrices[i]);
        const auto [first, end] = rows_of[i];
        if (hi < piece.first_elem || lo >= piece.end_elem || first >= end) continue;
        const int64_t from = block_bytes > 0 ? first / block_bytes : 0;
        const int64_t to = block_bytes > 0 ? (end - 1) / block_bytes : 0;
        for (int64_t b = from; b <= to; ++b) out.push_back(static_cast<int32_t>(b));
      }
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  }
  return blocks;
}

}  // namespace moelora::detail
