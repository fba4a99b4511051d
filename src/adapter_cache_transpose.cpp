// The one-pass conversion of B read down its columns (see adapter_cache_transpose.h).
//
// A tile is 8 rows of the source block by 8 columns per 16-byte lane of the widest vectors the
// CPU has (16, 32 or 64 bytes: one, two or four lanes); in-lane unpacks transpose it, so that
// each lane of the 8 results holds 8 rows of one column. Each column is widened to float32,
// multiplied by the scale and rounded back with integer operations that give the bits of
// StoreBF16 / StoreF16 (adapter_cache_convert.cpp) for every finite product. Non-finite values
// are only detected, never encoded: source exponents of all ones and products that round out
// of range are gathered into one mask, and when it has any the caller converts the piece again
// through its element path, which stores them as it does and names the first.
//
// Stores: the destinations of a block's columns become 16-byte aligned at one row (rows start
// 16-byte aligned and share their first element), so a partial tile leads up to that row; from
// there whole tiles go out 16 bytes per column, and where every column's cache lines start at
// one row, four tiles are gathered in an L1 buffer and each column's line is written whole with
// non-temporal stores: the host copy is written once and next read by the copy engine's DMA, so
// its lines need not be read in first nor kept in the cache. A partial tile ends the run.
#include "adapter_cache_transpose.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// The fused conversion needs GCC's vector extensions (__builtin_shuffle); elsewhere every B
// goes through transpose_block and the element path.
#if defined(__GNUC__) && !defined(__clang__)
#define MOELORA_COLUMN_TILES 1
#else
#define MOELORA_COLUMN_TILES 0
#endif

namespace moelora::detail {

namespace {

#if MOELORA_COLUMN_TILES
// ---- the fused conversion ---------------------------------------------------------------------
// Written once with GCC vectors of kBytes bytes, compiled for 16 (SSE2), 32 (AVX2) and 64
// (AVX-512) by the target versions of column_tiles_for below. A vector holds kBytes / 16 lanes
// of 16 bytes; all shuffles stay within lanes, as x86's unpack instructions do, so that a tile
// of 8 rows x 8 * lanes columns transposes as one 8 x 8 tile per lane.
//
// Vectors pass by value only between always-inline helpers, which never exist as calls: GCC's
// note that such arguments change the ABI without AVX does not apply. (GCC gives it at the end
// of the file, so it is off from here to there.)
#pragma GCC diagnostic ignored "-Wpsabi"

template <int kBytes>
struct Vec {
  typedef uint16_t u16 __attribute__((vector_size(kBytes)));
  typedef int16_t i16 __attribute__((vector_size(kBytes)));
  typedef uint32_t u32 __attribute__((vector_size(kBytes)));
  typedef int32_t i32 __attribute__((vector_size(kBytes)));
  typedef uint64_t u64 __attribute__((vector_size(kBytes)));
  typedef int64_t i64 __attribute__((vector_size(kBytes)));
  typedef float f32 __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / 16;
};

#define MOELORA_INLINE inline __attribute__((always_inline))

// Index e of the shuffle that interleaves the low (or high) halves of a and b within each lane
// of `per_lane` elements (n elements in all; indices from n on pick from b).
constexpr int interleaved(int e, int n, int per_lane, bool high) {
  const int lane = e / per_lane, m = e % per_lane;
  const int source = lane * per_lane + m / 2 + (high ? per_lane / 2 : 0);
  return m % 2 == 0 ? source : n + source;
}

template <bool kHigh, typename V, typename Mask, size_t... E>
MOELORA_INLINE V interleave(V a, V b, std::index_sequence<E...>) {
  constexpr int n = sizeof...(E);
  return __builtin_shuffle(a, b, Mask{interleaved(E, n, n / (sizeof(V) / 16), kHigh)...});
}

// Interleave of 16-, 32- or 64-bit elements (as _mm_unpacklo/hi_epi16/32/64 in every lane).
template <int kBits, bool kHigh, int kBytes>
MOELORA_INLINE typename Vec<kBytes>::u16 unpack(typename Vec<kBytes>::u16 a,
                                                typename Vec<kBytes>::u16 b) {
  using V = Vec<kBytes>;
  if constexpr (kBits == 16) {
    return interleave<kHigh, typename V::u16, typename V::i16>(
        a, b, std::make_index_sequence<kBytes / 2>());
  } else if constexpr (kBits == 32) {
    return (typename V::u16)interleave<kHigh, typename V::u32, typename V::i32>(
        (typename V::u32)a, (typename V::u32)b, std::make_index_sequence<kBytes / 4>());
  } else {
    return (typename V::u16)interleave<kHigh, typename V::u64, typename V::i64>(
        (typename V::u64)a, (typename V::u64)b, std::make_index_sequence<kBytes / 8>());
  }
}

// The low 16 bits of each 32-bit element of a, then of b, within each lane (the 16-bit results
// of one column, the way unpack<16> split them).
template <int kBytes, size_t... E>
MOELORA_INLINE typename Vec<kBytes>::u16 pack_low_halves(typename Vec<kBytes>::u32 a,
                                                         typename Vec<kBytes>::u32 b,
                                                         std::index_sequence<E...>) {
  using V = Vec<kBytes>;
  constexpr int n = kBytes / 2;
  return __builtin_shuffle((typename V::u16)a, (typename V::u16)b,
                           typename V::i16{(E % 8 < 4 ? 0 : n) + E / 8 * 8 + E % 4 * 2 ...});
}

// Eight rows of the tile become its columns: r[t], lane q is column 8 * q + t.
template <int kBytes>
MOELORA_INLINE void transpose_lanes(typename Vec<kBytes>::u16 r[8]) {
  using u16 = typename Vec<kBytes>::u16;
  const u16 t0 = unpack<16, false, kBytes>(r[0], r[1]), t1 = unpack<16, true, kBytes>(r[0], r[1]);
  const u16 t2 = unpack<16, false, kBytes>(r[2], r[3]), t3 = unpack<16, true, kBytes>(r[2], r[3]);
  const u16 t4 = unpack<16, false, kBytes>(r[4], r[5]), t5 = unpack<16, true, kBytes>(r[4], r[5]);
  const u16 t6 = unpack<16, false, kBytes>(r[6], r[7]), t7 = unpack<16, true, kBytes>(r[6], r[7]);
  const u16 u0 = unpack<32, false, kBytes>(t0, t2), u1 = unpack<32, true, kBytes>(t0, t2);
  const u16 u2 = unpack<32, false, kBytes>(t1, t3), u3 = unpack<32, true, kBytes>(t1, t3);
  const u16 u4 = unpack<32, false, kBytes>(t4, t6), u5 = unpack<32, true, kBytes>(t4, t6);
  const u16 u6 = unpack<32, false, kBytes>(t5, t7), u7 = unpack<32, true, kBytes>(t5, t7);
  r[0] = unpack<64, false, kBytes>(u0, u4);
  r[1] = unpack<64, true, kBytes>(u0, u4);
  r[2] = unpack<64, false, kBytes>(u1, u5);
  r[3] = unpack<64, true, kBytes>(u1, u5);
  r[4] = unpack<64, false, kBytes>(u2, u6);
  r[5] = unpack<64, true, kBytes>(u2, u6);
  r[6] = unpack<64, false, kBytes>(u3, u7);
  r[7] = unpack<64, true, kBytes>(u3, u7);
}

// Lanes of 16-bit elements whose exponent bits are all ones, as a mask.
template <int kBytes>
MOELORA_INLINE typename Vec<kBytes>::u16 all_ones_exponent(typename Vec<kBytes>::u16 bits,
                                                           uint16_t exponent) {
  return (typename Vec<kBytes>::u16)((bits & exponent) == exponent);
}

struct BF16In {
  static constexpr uint16_t kExponent = 0x7F80;
  // LoadBF16: the bits are the upper half of a float32.
  template <int kBytes>
  static MOELORA_INLINE void widen(typename Vec<kBytes>::u16 h, typename Vec<kBytes>::f32& lo,
                                   typename Vec<kBytes>::f32& hi) {
    using V = Vec<kBytes>;
    const typename V::u16 zero = {};
    lo = (typename V::f32)unpack<16, false, kBytes>(zero, h);
    hi = (typename V::f32)unpack<16, true, kBytes>(zero, h);
  }
};

struct F16In {
  static constexpr uint16_t kExponent = 0x7C00;
  // LoadF16 of finite values: exponent and mantissa moved into place and rebiased by a multiply
  // (which also normalises subnormals), then the sign.
  template <int kBytes>
  static MOELORA_INLINE void widen(typename Vec<kBytes>::u16 h, typename Vec<kBytes>::f32& lo,
                                   typename Vec<kBytes>::f32& hi) {
    using V = Vec<kBytes>;
    const typename V::u16 zero = {}, magnitude = h & 0x7FFF, sign = h & 0x8000;
    lo = (typename V::f32)((typename V::u32)unpack<16, false, kBytes>(magnitude, zero) << 13);
    hi = (typename V::f32)((typename V::u32)unpack<16, true, kBytes>(magnitude, zero) << 13);
    lo = (typename V::f32)((typename V::u32)(lo * 0x1p112f) |
                           (typename V::u32)unpack<16, false, kBytes>(zero, sign));
    hi = (typename V::f32)((typename V::u32)(hi * 0x1p112f) |
                           (typename V::u32)unpack<16, true, kBytes>(zero, sign));
  }
};

struct BF16Out {
  // StoreBF16 of finite products: (x + 0x7FFF + lsb) >> 16; one that rounds to infinity sets
  // `bad`.
  template <int kBytes>
  static MOELORA_INLINE typename Vec<kBytes>::u16 narrow(typename Vec<kBytes>::f32 lo,
                                                         typename Vec<kBytes>::f32 hi,
                                                         typename Vec<kBytes>::u16& bad) {
    using u32 = typename Vec<kBytes>::u32;
    const u32 x = (u32)lo, y = (u32)hi;
    const typename Vec<kBytes>::u16 bits = pack_low_halves<kBytes>(
        (x + 0x7FFF + ((x >> 16) & 1)) >> 16, (y + 0x7FFF + ((y >> 16) & 1)) >> 16,
        std::make_index_sequence<kBytes / 2>());
    bad |= all_ones_exponent<kBytes>(bits, 0x7F80);
    return bits;
  }
};

struct F16Out {
  // float_to_half_bits of a finite product below 65520 (larger ones set `bad`): normal halves
  // by rebiasing the exponent and rounding the 13 dropped mantissa bits to nearest even;
  // subnormal ones (below 2^-14) by adding 0.5, whose float32 unit is the subnormal half's
  // unit, so that the FPU rounds to nearest even, and taking 0.5 off the bits again.
  template <int kBytes>
  static MOELORA_INLINE typename Vec<kBytes>::u32 round(typename Vec<kBytes>::f32 v,
                                                        typename Vec<kBytes>::u16& bad) {
    using V = Vec<kBytes>;
    const typename V::u32 x = (typename V::u32)v, a = x & 0x7FFFFFFFu;
    bad |= (typename V::u16)(a > 0x477FEFFFu);
    const typename V::u32 normal = (a + 0xC8000FFFu + ((a >> 13) & 1)) >> 13;
    const typename V::u32 subnormal =
        (typename V::u32)((typename V::f32)a + 0.5f) - 0x3F000000u;
    return (a < 0x38800000u ? subnormal : normal) | ((x >> 16) & 0x8000u);
  }
  template <int kBytes>
  static MOELORA_INLINE typename Vec<kBytes>::u16 narrow(typename Vec<kBytes>::f32 lo,
                                                         typename Vec<kBytes>::f32 hi,
                                                         typename Vec<kBytes>::u16& bad) {
    return pack_low_halves<kBytes>(round<kBytes>(lo, bad), round<kBytes>(hi, bad),
                                   std::make_index_sequence<kBytes / 2>());
  }
};

// Same dtype, scale 1: the transposed bits as they are.
struct Copy {};

// One tile: rows [0, n) (n <= 8; rows past n read as zero) of the 8 * lanes columns at `src`,
// converted: on return, columns[t], lane q holds column 8 * q + t's n values.
template <int kBytes, class In, class Out>
MOELORA_INLINE void convert_tile(const std::byte* src, int64_t pitch, int64_t n, float scale,
                                 typename Vec<kBytes>::u16& bad,
                                 typename Vec<kBytes>::u16 columns[8]) {
  using V = Vec<kBytes>;
  for (int i = 0; i < 8; ++i) {
    columns[i] = typename V::u16{};
    if (i < n) std::memcpy(&columns[i], src + i * pitch, kBytes);
    bad |= all_ones_exponent<kBytes>(columns[i], In::kExponent);
    // The next tile's rows: strides of a row pitch (kilobytes) are more than the hardware
    // prefetchers follow.
    __builtin_prefetch(src + (8 + i) * pitch);
  }
  transpose_lanes<kBytes>(columns);
  if constexpr (!std::is_same_v<Out, Copy>) {
    for (int t = 0; t < 8; ++t) {
      typename V::f32 lo, hi;
      In::template widen<kBytes>(columns[t], lo, hi);
      columns[t] = Out::template narrow<kBytes>(lo * scale, hi * scale, bad);
    }
  }
}

// Destination bytes per streamed line: a cache line, 32 16-bit elements, 4 tiles of rows.
constexpr int64_t kLineBytes = 64;
constexpr int64_t kLineRows = kLineBytes / 2;

inline int64_t misalignment(const std::byte* p, int64_t alignment) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(alignment));
}

// The conversion of 8 * lanes columns, rows [0, rows) (convert).
template <int kBytes, class In, class Out>
struct ColumnBlock {
  static constexpr int kColumns = 8 * Vec<kBytes>::kLanes;
  using u16 = typename Vec<kBytes>::u16;
  const std::byte* src;  // (row 0, column 0)
  int64_t pitch;
  std::byte* const* dst;  // per column: where its row 0 goes
  float scale;
  u16& bad;

  // f(c, values) for every column c of a converted tile, values: its 16 bytes (unrolled, so
  // that every lane is taken out of its register at a known place).
  template <typename F>
  static MOELORA_INLINE void for_each_column(const u16 columns[8], F&& f) {
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
#pragma GCC unroll 4
      for (int q = 0; q < Vec<kBytes>::kLanes; ++q) {
        f(8 * q + t, reinterpret_cast<const std::byte*>(&columns[t]) + 16 * q);
      }
    }
  }

  // Rows [k, k + n) (n < 8), element by element out of the tile.
  MOELORA_INLINE void partial_tile(int64_t k, int64_t n) const {
    u16 columns[8];
    convert_tile<kBytes, In, Out>(src + k * pitch, pitch, n, scale, bad, columns);
    // 2 * n bytes as pieces of 8, 4 and 2: stores of known sizes rather than a memcpy call each.
    for_each_column(columns, [&](int c, const std::byte* values) {
      std::byte* to = dst[c] + 2 * k;
      int64_t at = 0;
      for (int64_t piece = 8; piece >= 2; piece /= 2) {
        if ((2 * n & piece) == 0) continue;
        std::memcpy(to + at, values + at, static_cast<size_t>(piece));
        at += piece;
      }
    });
  }

  // Rows [k0, k1) (whole tiles), 16 bytes per column and tile.
  MOELORA_INLINE void stored_tiles(int64_t k0, int64_t k1) const {
    for (int64_t k = k0; k < k1; k += 8) {
      u16 columns[8];
      convert_tile<kBytes, In, Out>(src + k * pitch, pitch, 8, scale, bad, columns);
      for_each_column(columns, [&](int c, const std::byte* values) {
        std::memcpy(dst[c] + 2 * k, values, 16);
      });
    }
  }

  // Rows [k0, k1) (whole lines; every dst[c] + 2 * k0 starts a line): four tiles gathered in an
  // L1 buffer, then every column's line written at once with non-temporal stores, so that the
  // destination's lines are neither read in first nor left in the cache.
  MOELORA_INLINE void streamed_lines(int64_t k0, int64_t k1) const {
    alignas(kLineBytes) std::byte lines[kColumns][kLineBytes];
    for (int64_t k = k0; k < k1; k += kLineRows) {
      for (int64_t q = 0; q < kLineRows / 8; ++q) {
        u16 columns[8];
        convert_tile<kBytes, In, Out>(src + (k + 8 * q) * pitch, pitch, 8, scale, bad, columns);
        for_each_column(columns, [&](int c, const std::byte* values) {
          std::memcpy(lines[c] + 16 * q, values, 16);
        });
      }
      for (int c = 0; c < kColumns; ++c) stream_line(dst[c] + 2 * k, lines[c]);
    }
  }

  static MOELORA_INLINE void stream_line(std::byte* to, const std::byte* line) {
#if defined(__SSE2__)
    for (int64_t b = 0; b < kLineBytes; b += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + b),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(line + b)));
    }
#else
    std::memcpy(to, line, kLineBytes);
#endif
  }

  // Rows [0, rows): a partial tile up to the row from which every column's destination is
  // 16-byte aligned (the same row for all: they share their alignment), whole tiles stored as
  // they come until the row where every column's cache lines start (when there is one), whole
  // lines streamed, whole tiles, a partial tile.
  MOELORA_INLINE void convert(int64_t rows) const {
    int64_t k = std::min(rows, (16 - misalignment(dst[0], 16)) % 16 / 2);
    if (k > 0) partial_tile(0, k);
    const int64_t tiles_end = k + (rows - k) / 8 * 8;
    const int64_t line_offset = misalignment(dst[0] + 2 * k, kLineBytes);
    bool lines_align = true;
    for (int c = 1; c < kColumns; ++c) {
      lines_align = lines_align && misalignment(dst[c] + 2 * k, kLineBytes) == line_offset;
    }
    if (lines_align) {
      const int64_t line_start =
          std::min(tiles_end, k + (kLineBytes - line_offset) % kLineBytes / 2);
      const int64_t line_end = line_start + (tiles_end - line_start) / kLineRows * kLineRows;
      stored_tiles(k, line_start);
      streamed_lines(line_start, line_end);
      k = line_end;
    }
    stored_tiles(k, tiles_end);
    if (tiles_end < rows) partial_tile(tiles_end, rows - tiles_end);
  }
};

// Blocks of 8 * lanes columns, then blocks of 8 at 16 bytes.
template <int kBytes, class In, class Out>
MOELORA_INLINE bool column_tiles(const std::byte* src, int64_t pitch, int64_t rows,
                                 int64_t columns, std::byte* const* dst, float scale) {
  typename Vec<kBytes>::u16 bad = {};
  typename Vec<16>::u16 narrow_bad = {};
  constexpr int64_t kColumns = ColumnBlock<kBytes, In, Out>::kColumns;
  int64_t c = 0;
  for (; c + kColumns <= columns; c += kColumns) {
    ColumnBlock<kBytes, In, Out>{src + 2 * c, pitch, dst + c, scale, bad}.convert(rows);
  }
  for (; c < columns; c += 8) {
    ColumnBlock<16, In, Out>{src + 2 * c, pitch, dst + c, scale, narrow_bad}.convert(rows);
  }
  uint16_t any = 0;
  for (int e = 0; e < kBytes / 2; ++e) any |= bad[e];
  for (int e = 0; e < 8; ++e) any |= narrow_bad[e];
  return any == 0;
}

template <int kBytes, class In>
MOELORA_INLINE bool column_tiles_to(DType dst_dtype, bool copy, const std::byte* src,
                                    int64_t pitch, int64_t rows, int64_t columns,
                                    std::byte* const* dst, float scale) {
  if (copy) return column_tiles<kBytes, In, Copy>(src, pitch, rows, columns, dst, scale);
  return dst_dtype == DType::kBFloat16
             ? column_tiles<kBytes, In, BF16Out>(src, pitch, rows, columns, dst, scale)
             : column_tiles<kBytes, In, F16Out>(src, pitch, rows, columns, dst, scale);
}

template <int kBytes>
MOELORA_INLINE bool column_tiles_of(const std::byte* src, int64_t pitch, int64_t rows,
                                    int64_t columns, std::byte* const* dst, DType src_dtype,
                                    DType dst_dtype, float scale) {
  const bool copy = src_dtype == dst_dtype && scale == 1.0f;
  return src_dtype == DType::kBFloat16
             ? column_tiles_to<kBytes, BF16In>(dst_dtype, copy, src, pitch, rows, columns, dst,
                                               scale)
             : column_tiles_to<kBytes, F16In>(dst_dtype, copy, src, pitch, rows, columns, dst,
                                              scale);
}

// The widest vectors the CPU has, picked at load time (GCC's target versions; elsewhere 16
// bytes). Not under ThreadSanitizer: the versions' resolvers run before its runtime is up.
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
__attribute__((target("default"))) bool column_tiles_for(const std::byte* src, int64_t pitch,
                                                         int64_t rows, int64_t columns,
                                                         std::byte* const* dst,
                                                         DType src_dtype, DType dst_dtype,
                                                         float scale) {
  return column_tiles_of<16>(src, pitch, rows, columns, dst, src_dtype, dst_dtype, scale);
}
__attribute__((target("arch=x86-64-v3"))) bool column_tiles_for(
    const std::byte* src, int64_t pitch, int64_t rows, int64_t columns, std::byte* const* dst,
    DType src_dtype, DType dst_dtype, float scale) {
  return column_tiles_of<32>(src, pitch, rows, columns, dst, src_dtype, dst_dtype, scale);
}
__attribute__((target("arch=x86-64-v4"))) bool column_tiles_for(
    const std::byte* src, int64_t pitch, int64_t rows, int64_t columns, std::byte* const* dst,
    DType src_dtype, DType dst_dtype, float scale) {
  return column_tiles_of<64>(src, pitch, rows, columns, dst, src_dtype, dst_dtype, scale);
}
#else
bool column_tiles_for(const std::byte* src, int64_t pitch, int64_t rows, int64_t columns,
                      std::byte* const* dst, DType src_dtype, DType dst_dtype, float scale) {
  return column_tiles_of<16>(src, pitch, rows, columns, dst, src_dtype, dst_dtype, scale);
}
#endif
#undef MOELORA_INLINE
#endif  // MOELORA_COLUMN_TILES

bool is_16_bit_float(DType dtype) {
  return dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

}  // namespace

bool converts_column_tiles(DType src, DType dst) {
  return MOELORA_COLUMN_TILES && is_16_bit_float(src) && is_16_bit_float(dst);
}

bool convert_column_tiles(const std::byte* src, int64_t pitch, int64_t rows, int64_t columns,
                          std::byte* const* dst, DType src_dtype, DType dst_dtype, float scale) {
#if MOELORA_COLUMN_TILES
  return column_tiles_for(src, pitch, rows, columns, dst, src_dtype, dst_dtype, scale);
#else
  return false;
#endif
}

}  // namespace moelora::detail
