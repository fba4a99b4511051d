// The conversion pass of a disk -> host load: one chunk, just read and still in the reader's
// cache, written into the rows of the host copy in one pass per element: source dtype -> model
// dtype, scale folded into B, every stored value checked finite.
//
// Three shapes of views:
//  - rows of the tensor (A, [r, in] or fused [E*r, in]): each view row is a contiguous run;
//  - columns of the tensor (B stored [out, r] or fused [out, E*r], read as B^T rows): 16-bit to
//    16-bit, tiles of the piece are transposed and converted in registers and stored straight
//    into the view rows (convert_column_tiles, adapter_cache_transpose.cpp), columns outside a
//    tile element by element. Otherwise (32-bit source or model dtype, a non-finite value to
//    name, views that share a column) the piece's rows are first transposed in the cache
//    (blocked, per column step phase so that interleaved gate/up rows come out contiguous),
//    then converted as contiguous runs;
//  - anything else: a strided gather per view row.
// Loads and stores go through memcpy: tensors may sit at any byte offset of their file. On
// x86-64 the element loops are compiled for SSE2, AVX2 and AVX-512 and picked at load time
// (the conversion is the reader threads' compute), 16-bit transposes use 8 x 8 SSE2 tiles, and
// runs copied as they are (same dtype, scale 1: A of a bf16 adapter) go to the host copy with
// non-temporal stores: it is written once and next read by the copy engine's DMA, so its lines
// need not be read in first nor kept in the cache. (Runs the element loops convert are stored
// normally: through an L1 buffer and streamed out they measured slower.)
#include <algorithm>
#include <cmath>
#include <cstring>

// (Not under ThreadSanitizer: the clones' resolvers run before its runtime is up.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_THREAD__)
#define MOELORA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOELORA_VECTOR_CLONES
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "adapter_cache_internal.h"
#include "adapter_cache_transpose.h"
#include "half_convert.h"
#include "moelora/error.h"

namespace moelora::detail {

void stream_copy(std::byte* dst, const std::byte* src, int64_t bytes) {
#if defined(__SSE2__)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, static_cast<size_t>(head));
  int64_t at = head;
  for (; at + 64 <= bytes; at += 64) {
    for (int64_t k = 0; k < 64; k += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + at + k),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at + k)));
    }
  }
  for (; at + 16 <= bytes; at += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + at),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at)));
  }
  std::memcpy(dst + at, src + at, static_cast<size_t>(bytes - at));
#else
  std::memcpy(dst, src, static_cast<size_t>(bytes));
#endif
}

void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

namespace {

struct LoadF32 {
  static constexpr int64_t kBytes = 4;
  static float get(const std::byte* p) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
};

struct LoadBF16 {
  static constexpr int64_t kBytes = 2;
  static float get(const std::byte* p) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    const uint32_t x = uint32_t{b} << 16;
    float v;
    std::memcpy(&v, &x, 4);
    return v;
  }
};

struct LoadF16 {
  static constexpr int64_t kBytes = 2;
  // Exponent and mantissa moved into place and rebiased by a multiply (which also normalises
  // subnormals); infinities and NaN get the all-ones exponent back.
  static float get(const std::byte* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    uint32_t x = uint32_t{h & 0x7FFFu} << 13;
    float v;
    std::memcpy(&v, &x, 4);
    v *= 0x1p112f;
    std::memcpy(&x, &v, 4);
    x |= (h & 0x7C00u) == 0x7C00u ? 0x7F800000u : 0u;
    x |= uint32_t{h & 0x8000u} << 16;
    std::memcpy(&v, &x, 4);
    return v;
  }
};

struct StoreF32 {
  static constexpr int64_t kBytes = 4;
  static uint32_t put(float v, std::byte* p) {
    std::memcpy(p, &v, 4);
    uint32_t x;
    std::memcpy(&x, &v, 4);
    return static_cast<uint32_t>((x & 0x7F800000u) == 0x7F800000u);
  }
  static bool bad(const std::byte* p) {
    uint32_t x;
    std::memcpy(&x, p, 4);
    return (x & 0x7F800000u) == 0x7F800000u;
  }
};

struct StoreBF16 {
  static constexpr int64_t kBytes = 2;
  // Round to nearest even (float_to_bfloat16_bits), branch-free so that the loop vectorizes.
  static uint32_t put(float v, std::byte* p) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    const uint32_t nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
    const uint16_t bits = static_cast<uint16_t>(nan ? ((x >> 16) | 0x40u) : rounded);
    std::memcpy(p, &bits, 2);
    return static_cast<uint32_t>((bits & 0x7F80u) == 0x7F80u);
  }
  static bool bad(const std::byte* p) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    return (b & 0x7F80u) == 0x7F80u;
  }
};

struct StoreF16 {
  static constexpr int64_t kBytes = 2;
  static uint32_t put(float v, std::byte* p) {
    const uint16_t bits = float_to_half_bits(v);
    std::memcpy(p, &bits, 2);
    return static_cast<uint32_t>((bits & 0x7C00u) == 0x7C00u);
  }
  static bool bad(const std::byte* p) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    return (b & 0x7C00u) == 0x7C00u;
  }
};

template <class Load, class Store, bool kUnitStride>
inline __attribute__((always_inline)) int64_t convert_loop(const std::byte* src, int64_t stride, int64_t n, float scale,
                     std::byte* dst) {
  uint32_t any_bad = 0;
  const int64_t step = (kUnitStride ? 1 : stride) * Load::kBytes;
  for (int64_t c = 0; c < n; ++c) {
    any_bad |= Store::put(Load::get(src + c * step) * scale, dst + c * Store::kBytes);
  }
  if (any_bad == 0) return -1;
  for (int64_t c = 0; c < n; ++c) {
    if (Store::bad(dst + c * Store::kBytes)) return c;
  }
  return -1;
}

// The finite check of 16- or 32-bit elements that are copied as they are (same dtype, scale
// 1): the source is still in the cache, the copy streams.
template <typename Bits, Bits kExponent>
inline __attribute__((always_inline)) int64_t check_loop(const std::byte* src, int64_t n) {
  Bits any_bad = 0;
  for (int64_t c = 0; c < n; ++c) {
    Bits x;
    std::memcpy(&x, src + c * sizeof(Bits), sizeof(Bits));
    any_bad |= static_cast<Bits>((x & kExponent) == kExponent);
  }
  if (any_bad == 0) return -1;
  for (int64_t c = 0; c < n; ++c) {
    Bits x;
    std::memcpy(&x, src + c * sizeof(Bits), sizeof(Bits));
    if ((x & kExponent) == kExponent) return c;
  }
  return -1;
}

template <class Load, class Store>
inline __attribute__((always_inline)) int64_t convert_with(const std::byte* src, int64_t stride,
                                                           int64_t n, float scale,
                                                           std::byte* dst) {
  return stride == 1 ? convert_loop<Load, Store, true>(src, 1, n, scale, dst)
                     : convert_loop<Load, Store, false>(src, stride, n, scale, dst);
}

template <class Load>
inline __attribute__((always_inline)) int64_t convert_to(DType dst_dtype, const std::byte* src,
                                                         int64_t stride, int64_t n, float scale,
                                                         std::byte* dst) {
  switch (dst_dtype) {
    case DType::kFloat32: return convert_with<Load, StoreF32>(src, stride, n, scale, dst);
    case DType::kBFloat16: return convert_with<Load, StoreBF16>(src, stride, n, scale, dst);
    case DType::kFloat16: return convert_with<Load, StoreF16>(src, stride, n, scale, dst);
    default: throw InternalError("adapter weights cannot be stored as " +
                                 std::string(dtype_name(dst_dtype)));
  }
}

int64_t ceil_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}
int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Scalar transpose of the [k0, k1) x [c0, c1) part of a [rows, cols] block (see below).
template <typename T>
void transpose_scalar(const std::byte* in, int64_t pitch, int64_t rows, int64_t k0, int64_t k1,
                      int64_t c0, int64_t c1, T* out) {
  for (int64_t k = k0; k < k1; ++k) {
    const std::byte* row = in + k * pitch * static_cast<int64_t>(sizeof(T));
    for (int64_t c = c0; c < c1; ++c) {
      std::memcpy(&out[c * rows + k], row + c * static_cast<int64_t>(sizeof(T)), sizeof(T));
    }
  }
}

#if defined(__SSE2__)
// The 8 x 8 tile of 16-bit elements at `in` (row pitch in bytes) transposed to `out`.
inline void transpose_8x8_u16(const std::byte* in, int64_t in_pitch, std::byte* out,
                              int64_t out_pitch) {
  __m128i r[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_pitch));
  }
  const __m128i t0 = _mm_unpacklo_epi16(r[0], r[1]), t1 = _mm_unpackhi_epi16(r[0], r[1]);
  const __m128i t2 = _mm_unpacklo_epi16(r[2], r[3]), t3 = _mm_unpackhi_epi16(r[2], r[3]);
  const __m128i t4 = _mm_unpacklo_epi16(r[4], r[5]), t5 = _mm_unpackhi_epi16(r[4], r[5]);
  const __m128i t6 = _mm_unpacklo_epi16(r[6], r[7]), t7 = _mm_unpackhi_epi16(r[6], r[7]);
  const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
  const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
  const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
  const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
  const __m128i columns[8] = {_mm_unpacklo_epi64(u0, u4), _mm_unpackhi_epi64(u0, u4),
                              _mm_unpacklo_epi64(u1, u5), _mm_unpackhi_epi64(u1, u5),
                              _mm_unpacklo_epi64(u2, u6), _mm_unpackhi_epi64(u2, u6),
                              _mm_unpacklo_epi64(u3, u7), _mm_unpackhi_epi64(u3, u7)};
  for (int i = 0; i < 8; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * out_pitch), columns[i]);
  }
}

// The 4 x 4 tile of 32-bit elements at `in` (row pitch in bytes) transposed to `out`.
inline void transpose_4x4_u32(const std::byte* in, int64_t in_pitch, std::byte* out,
                              int64_t out_pitch) {
  __m128i r[4];
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_pitch));
  }
  const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
  const __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
  const __m128i columns[4] = {_mm_unpacklo_epi64(t0, t2), _mm_unpackhi_epi64(t0, t2),
                              _mm_unpacklo_epi64(t1, t3), _mm_unpackhi_epi64(t1, t3)};
  for (int i = 0; i < 4; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * out_pitch), columns[i]);
  }
}
#endif

// out[c * rows + k] = in[k * pitch + c] for a [rows, cols] block of `in` (row pitch `pitch`
// elements): tiles of 16 bytes a side (8 x 8 16-bit or 4 x 4 32-bit elements), so that each
// output row gets 16 contiguous bytes per tile.
template <typename T>
void transpose_block(const std::byte* in, int64_t pitch, int64_t rows, int64_t cols, T* out) {
  constexpr int64_t kTile = 16 / sizeof(T);
  const int64_t full_rows = rows / kTile * kTile, full_cols = cols / kTile * kTile;
#if defined(__SSE2__)
  const int64_t in_pitch = pitch * static_cast<int64_t>(sizeof(T));
  const int64_t out_pitch = rows * static_cast<int64_t>(sizeof(T));
  for (int64_t k0 = 0; k0 < full_rows; k0 += kTile) {
    for (int64_t c0 = 0; c0 < full_cols; c0 += kTile) {
      const std::byte* tile = in + k0 * in_pitch + c0 * static_cast<int64_t>(sizeof(T));
      std::byte* to = reinterpret_cast<std::byte*>(out + c0 * rows + k0);
      if (sizeof(T) == 2) {
        transpose_8x8_u16(tile, in_pitch, to, out_pitch);
      } else {
        transpose_4x4_u32(tile, in_pitch, to, out_pitch);
      }
    }
  }
#else
  transpose_scalar(in, pitch, rows, 0, full_rows, 0, full_cols, out);
#endif
  transpose_scalar(in, pitch, rows, 0, full_rows, full_cols, cols, out);  // right edge
  transpose_scalar(in, pitch, rows, full_rows, rows, 0, cols, out);       // bottom edge
}

class PieceWriter {
 public:
  PieceWriter(const AdapterEntry& entry, const TensorGroup& group, const ChunkPiece& piece,
              const std::byte* chunk, DType model_dtype, const HostBuffer& host)
      : entry_(entry), group_(group), piece_(piece),
        data_(chunk + piece.staging_offset), model_dtype_(model_dtype),
        model_elem_(static_cast<int64_t>(dtype_size(model_dtype))), host_(host) {}

  // A contiguous run (or one strided by `stride`) of view row `i`, columns [j0, j0 + n), read
  // from `src`; a non-finite result throws naming the element.
  void write(const LoraMatrixSource& m, int64_t i, int64_t j0, int64_t n, const std::byte* src,
             int64_t stride) const {
    if (n <= 0) return;
    const int64_t bad = convert_elements(src, group_.info.dtype, stride, n, scale_of(m),
                                         row(m, i, j0), model_dtype_);
    if (bad >= 0) refuse(m, i, j0 + bad);
  }

  // Where element (i, j) of view `m` goes in the host copy. A row never straddles a page, nor
  // so a block of the host copy: the row's later elements follow it.
  std::byte* row(const LoraMatrixSource& m, int64_t i, int64_t j) const {
    return host_.at(entry_.layout->row_offset(m.site, m.layer, m.expert, m.is_b,
                                              static_cast<int>(i)) +
                    j * model_elem_);
  }

  static float scale_of(const LoraMatrixSource& m) { return m.is_b ? m.scale : 1.0f; }
  DType model_dtype() const { return model_dtype_; }

  // Source element `flat` of the tensor, from the piece.
  const std::byte* at(int64_t flat) const {
    return data_ + (flat - piece_.first_elem) * group_.elem_bytes;
  }

  [[noreturn]] void refuse(const LoraMatrixSource& m, int64_t i, int64_t j) const {
    const float source =
        load_as_float(at(m.offset + i * m.row_stride + j * m.col_stride), group_.info.dtype, 0);
    const std::string value = std::isnan(source)   ? std::string("NaN")
                              : std::isinf(source) ? std::string("Inf")
                                                   : "a value that overflows " +
                                                         std::string(dtype_name(model_dtype_));
    throw AdapterError(entry_.name, "tensor '" + m.tensor + "' holds " + value + " (at [" +
                                        std::to_string(i) + ", " + std::to_string(j) + "] of " +
                                        matrix_name(m) + ", file '" +
                                        base_name(entry_.spec.files[m.file]) + "')");
  }

 private:
  const AdapterEntry& entry_;
  const TensorGroup& group_;
  const ChunkPiece& piece_;
  const std::byte* data_;
  DType model_dtype_;
  int64_t model_elem_;
  const HostBuffer& host_;
};

// A walks-columns view within the source rows [row_begin, row_end) of a piece: its first
// source row and column, and the run [j0, j1) of its view columns there (empty: j0 >= j1).
struct ColumnRun {
  int64_t first = 0;
  int64_t column0 = 0;
  int64_t j0 = 0;
  int64_t j1 = 0;
};

ColumnRun column_run(const LoraMatrixSource& m, const TensorGroup& g, int64_t row_begin,
                     int64_t row_end) {
  const int64_t cols = g.row_elems, step = g.column_step;
  ColumnRun run;
  run.first = m.offset / cols;
  run.column0 = m.offset % cols;
  run.j0 = std::max<int64_t>(0, ceil_div(row_begin - run.first, step));
  run.j1 = std::min<int64_t>(m.cols, ceil_div(row_end - run.first, step));
  return run;
}

// The views of a walks-columns piece that read the same rows of it (one first row, one run
// [j0, j1) of view columns) with one scale. Each column of the tensor belongs to at most one
// view row of a band: dst holds, per column, where that view row's element j0 goes (null for
// columns no view of the band reads).
struct Band {
  int64_t first = 0;
  int64_t j0 = 0;
  int64_t j1 = 0;
  float scale = 1.0f;
  std::vector<std::byte*> dst;
};

// The piece's views sorted into bands; false when two view rows of a band read one column.
bool gather_bands(const AdapterEntry& entry, const TensorGroup& g, const ChunkPiece& piece,
                  const PieceWriter& writer, std::vector<Band>& bands) {
  const int64_t cols = g.row_elems;
  const int64_t row_begin = piece.first_elem / cols, row_end = piece.end_elem / cols;
  for (int32_t index : g.matrices) {
    const LoraMatrixSource& m = entry.spec.matrices[index];
    const ColumnRun run = column_run(m, g, row_begin, row_end);
    if (run.j0 >= run.j1) continue;
    const int64_t first = run.first, column0 = run.column0, j0 = run.j0, j1 = run.j1;
    const float scale = PieceWriter::scale_of(m);
    auto band = std::find_if(bands.begin(), bands.end(), [&](const Band& b) {
      return b.first == first && b.j0 == j0 && b.j1 == j1 && b.scale == scale;
    });
    if (band == bands.end()) {
      bands.push_back({first, j0, j1, scale, std::vector<std::byte*>(cols, nullptr)});
      band = bands.end() - 1;
    }
    for (int64_t i = 0; i < m.rows; ++i) {
      std::byte*& dst = band->dst[column0 + i * m.row_stride];
      if (dst != nullptr) return false;
      dst = writer.row(m, i, j0);
    }
  }
  return true;
}

// One band of a 16-bit piece (`in`: its first row) converted while transposed: runs of 8
// columns whose destinations all exist (and share their alignment) go through
// convert_column_tiles, any other column element by element (strided). False when a value is
// not finite (the band is then partly written).
bool convert_band(const Band& b, const TensorGroup& g, const std::byte* in, int64_t row_begin,
                  DType model_dtype) {
  const int64_t cols = g.row_elems, step = g.column_step, elem = g.elem_bytes;
  const int64_t pitch = step * cols * elem;
  const std::byte* src = in + (b.first + b.j0 * step - row_begin) * cols * elem;  // (j0, 0)
  const int64_t rows = b.j1 - b.j0;
  auto tiles_fit = [&](int64_t c) {
    const uintptr_t alignment = reinterpret_cast<uintptr_t>(b.dst[c]) % 16;
    return std::all_of(b.dst.begin() + c, b.dst.begin() + c + 8, [&](const std::byte* d) {
      return d != nullptr && reinterpret_cast<uintptr_t>(d) % 16 == alignment;
    });
  };
  int64_t c = 0;
  while (c < cols) {
    int64_t end = c;
    while (end + 8 <= cols && tiles_fit(end)) end += 8;
    if (end > c) {
      if (!convert_column_tiles(src + c * elem, pitch, rows, end - c, b.dst.data() + c,
                                g.info.dtype, model_dtype, b.scale)) {
        return false;
      }
      c = end;
      continue;
    }
    if (b.dst[c] != nullptr &&
        convert_elements(src + c * elem, g.info.dtype, step * cols, rows, b.scale, b.dst[c],
                         model_dtype) >= 0) {
      return false;
    }
    ++c;
  }
  return true;
}

// Views that walk columns, 16-bit to 16-bit, in one pass (convert_band per band); false when the
// piece must go through transpose_and_convert (a value is not finite, or views share columns).
bool convert_columns_fused(const AdapterEntry& entry, const TensorGroup& g,
                           const ChunkPiece& piece, const PieceWriter& writer) {
  std::vector<Band> bands;
  if (!gather_bands(entry, g, piece, writer, bands)) return false;
  const int64_t row_begin = piece.first_elem / g.row_elems;
  const std::byte* in = writer.at(piece.first_elem);
  for (const Band& b : bands) {
    if (!convert_band(b, g, in, row_begin, writer.model_dtype())) return false;
  }
  return true;
}

// Views that walk columns, in two passes: transpose the piece's rows per phase of the column
// step, then every view row is a contiguous run of one transposed column. The element path
// refuses the first non-finite value in view order (matrix, row, column).
void transpose_and_convert(const AdapterEntry& entry, const TensorGroup& g,
                           const ChunkPiece& piece, const PieceWriter& writer,
                           ReaderScratch& scratch) {
  const int64_t cols = g.row_elems, step = g.column_step;
  const int64_t row_begin = piece.first_elem / cols, row_end = piece.end_elem / cols;
  scratch.transposed.resize(static_cast<size_t>((row_end - row_begin) * cols * g.elem_bytes));
  std::byte* out = scratch.transposed.data();
  const std::byte* in = writer.at(piece.first_elem);
  // Phase p holds rows r = first_of_phase(p) + k * step; its transposed block is [cols][count].
  std::vector<int64_t> first_row(step), count(step), base(step);
  int64_t offset = 0;
  for (int64_t p = 0; p < step; ++p) {
    first_row[p] = row_begin + ((p - row_begin) % step + step) % step;
    count[p] = first_row[p] < row_end ? ceil_div(row_end - first_row[p], step) : 0;
    base[p] = offset;
    const std::byte* phase_in = in + (first_row[p] - row_begin) * cols * g.elem_bytes;
    if (g.elem_bytes == 2) {
      transpose_block<uint16_t>(phase_in, step * cols, count[p], cols,
                                reinterpret_cast<uint16_t*>(out + offset * 2));
    } else {
      transpose_block<uint32_t>(phase_in, step * cols, count[p], cols,
                                reinterpret_cast<uint32_t*>(out + offset * 4));
    }
    offset += count[p] * cols;
  }
  for (int32_t index : g.matrices) {
    const LoraMatrixSource& m = entry.spec.matrices[index];
    const ColumnRun run = column_run(m, g, row_begin, row_end);
    if (run.j0 >= run.j1) continue;
    const int64_t first = run.first, column0 = run.column0, j0 = run.j0, j1 = run.j1;
    const int64_t p = first % step;
    const int64_t k0 = (first + j0 * step - first_row[p]) / step;
    for (int64_t i = 0; i < m.rows; ++i) {
      const int64_t column = column0 + i * m.row_stride;
      writer.write(m, i, j0, j1 - j0,
                   out + (base[p] + column * count[p] + k0) * g.elem_bytes, 1);
    }
  }
}

// Views that walk columns: 16-bit to 16-bit in one pass where it can, else (32-bit elements, a
// non-finite value to name, views sharing columns) in two.
void convert_columns(const AdapterEntry& entry, const TensorGroup& g, const ChunkPiece& piece,
                     const PieceWriter& writer, ReaderScratch& scratch) {
  if (converts_column_tiles(g.info.dtype, writer.model_dtype()) &&
      convert_columns_fused(entry, g, piece, writer)) {
    return;
  }
  transpose_and_convert(entry, g, piece, writer, scratch);
}

// Any other view: per view row, the columns whose elements lie in the piece.
void convert_rows(const AdapterEntry& entry, const TensorGroup& g, const ChunkPiece& piece,
                  const PieceWriter& writer) {
  const int64_t lo = piece.first_elem, hi = piece.end_elem;  // [lo, hi)
  for (int32_t index : g.matrices) {
    const LoraMatrixSource& m = entry.spec.matrices[index];
    auto [first, last] = view_extent(m);
    if (last < lo || first >= hi) continue;
    const int64_t cs = m.col_stride;
    for (int64_t i = 0; i < m.rows; ++i) {
      const int64_t row = m.offset + i * m.row_stride;  // flat index of (i, 0)
      int64_t j0 = 0, j1 = 0;
      if (cs > 0) {
        j0 = std::max<int64_t>(0, ceil_div(lo - row, cs));
        j1 = std::min<int64_t>(m.cols, ceil_div(hi - row, cs));
      } else if (cs < 0) {
        j0 = std::max<int64_t>(0, floor_div(row - hi, -cs) + 1);
        j1 = std::min<int64_t>(m.cols, floor_div(row - lo, -cs) + 1);
      } else if (row >= lo && row < hi) {
        j1 = m.cols;
      }
      if (j0 < j1) writer.write(m, i, j0, j1 - j0, writer.at(row + j0 * cs), cs);
    }
  }
}

}  // namespace

MOELORA_VECTOR_CLONES
int64_t convert_block(const std::byte* src, DType src_dtype, int64_t stride, int64_t n,
                      float scale, std::byte* dst, DType dst_dtype) {
  if (src_dtype == dst_dtype && scale == 1.0f && stride == 1) {
    if (src_dtype == DType::kFloat32) return check_loop<uint32_t, 0x7F800000u>(src, n);
    if (src_dtype == DType::kBFloat16) return check_loop<uint16_t, 0x7F80u>(src, n);
    if (src_dtype == DType::kFloat16) return check_loop<uint16_t, 0x7C00u>(src, n);
  }
  switch (src_dtype) {
    case DType::kFloat32: return convert_to<LoadF32>(dst_dtype, src, stride, n, scale, dst);
    case DType::kBFloat16: return convert_to<LoadBF16>(dst_dtype, src, stride, n, scale, dst);
    case DType::kFloat16: return convert_to<LoadF16>(dst_dtype, src, stride, n, scale, dst);
    default: throw InternalError("adapter weights cannot be read from " +
                                 std::string(dtype_name(src_dtype)));
  }
}

int64_t convert_elements(const std::byte* src, DType src_dtype, int64_t stride, int64_t n,
                         float scale, std::byte* dst, DType dst_dtype) {
  if (src_dtype == dst_dtype && scale == 1.0f && stride == 1) {
    const int64_t bad = convert_block(src, src_dtype, 1, n, 1.0f, nullptr, dst_dtype);
    stream_copy(dst, src, n * static_cast<int64_t>(dtype_size(dst_dtype)));
    return bad;
  }
  return convert_block(src, src_dtype, stride, n, scale, dst, dst_dtype);
}

void convert_piece(const AdapterEntry& entry, const ReadPlan& plan, const ChunkPiece& piece,
                   const std::byte* chunk_bytes, DType model_dtype, const HostBuffer& host,
                   ReaderScratch& scratch) {
  const TensorGroup& g = plan.groups[piece.group];
  PieceWriter writer(entry, g, piece, chunk_bytes, model_dtype, host);
  if (g.walks_columns) {
    convert_columns(entry, g, piece, writer, scratch);
  } else {
    convert_rows(entry, g, piece, writer);
  }
}

}  // namespace moelora::detail
