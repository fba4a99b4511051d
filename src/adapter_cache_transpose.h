// Internal: the one-pass conversion of B matrices read down their columns
// (adapter_cache_convert.cpp). B is stored [out, r] or fused [out, E*r] and kept as B^T rows, so
// each column of the stored tensor becomes one contiguous destination run: tiles of 8 rows are
// transposed and converted in registers (scale, rounding, finite check) and every column's
// values go straight to its run, with no transposed copy of the piece in between.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moelora/dtype.h"

namespace moelora::detail {

// Whether convert_column_tiles converts `src` elements to `dst`: bfloat16 or float16 to either.
bool converts_column_tiles(DType src, DType dst);

// For every column c in [0, columns) (a multiple of 8) and row k in [0, rows): element (k, c)
// of the block at `src` (row pitch `pitch` bytes), times `scale`, rounded to nearest even in
// `dst_dtype`, stored at dst[c] + 2 * k; the values are those convert_elements stores. The
// destinations share their alignment to 16 bytes; those whose whole cache lines start at one
// row are written a line at a time with non-temporal stores (stream_fence() before another
// thread or a DMA reads them). Returns false where any source value is not finite or a product
// does not fit `dst_dtype` (what was stored is then unspecified: the caller converts the block
// again to say where).
bool convert_column_tiles(const std::byte* src, int64_t pitch, int64_t rows, int64_t columns,
                          std::byte* const* dst, DType src_dtype, DType dst_dtype, float scale);

}  // namespace moelora::detail
