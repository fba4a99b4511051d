// CPU reference of the paged KV cache: kv_cache_write and paged_attention.
//   Cache slot s of a layer lives in page s / block_tokens at offset s % block_tokens; a page
//   holds K as [block_tokens][num_kv_heads][head_dim] followed by V in the same layout.
//   paged_attention, per query token t (sequence q_seq, position q_pos) and head h:
//     kv head g = h / (num_heads / num_kv_heads)                               (GQA)
//     keys j in [max(0, q_pos - window + 1) if window > 0 else 0, min(q_pos, seq_len - 1)]
//     logit_j = scale * <q, K_j>,  m = max(max_j logit_j, sink_h)
//     out = sum_j exp(logit_j - m) V_j / (sum_j exp(logit_j - m) + exp(sink_h - m))
//   The sink term (GPT-OSS) only enlarges the denominator; without sinks it is absent. A query
//   that sees no key writes zeros. Softmax subtracts the running max, so large logits are safe.
// Work is split over query tokens; each writes only its own output row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/dispatch.h"
#include "kernels/validate.h"

namespace moelora::cpu {

namespace {

int32_t int32_elem(const TensorRef& t, int64_t i) {
  return static_cast<const int32_t*>(t.data)[i * t.stride[0]];
}

// Byte offset of K (or V) of one token and kv head inside the arena.
struct KvAddress {
  const KvCacheView& cache;
  int64_t elem_bytes;
  int64_t half_page_elems;  // K part of a page, in elements

  int64_t offset(int64_t page, int64_t in_page, int64_t kv_head, bool is_value) const {
    int64_t elems = (in_page * cache.num_kv_heads + kv_head) * cache.head_dim +
                    (is_value ? half_page_elems : 0);
    return page * cache.page_bytes + elems * elem_bytes;
  }
};

template <typename T>
void write_tokens(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                  const KvCacheView& cache, const KvAddress& address) {
  const int64_t num_tokens = key.shape[0];
  const auto* slots = static_cast<const int64_t*>(slot_mapping.data);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t * slot_mapping.stride[0]];
    if (slot < 0) continue;
    const int64_t page = slot / cache.block_tokens;
    const int64_t in_page = slot % cache.block_tokens;
    for (int64_t g = 0; g < cache.num_kv_heads; ++g) {
      const T* k_src = static_cast<const T*>(key.data) + t * key.stride[0] + g * key.stride[1];
      const T* v_src =
          static_cast<const T*>(value.data) + t * value.stride[0] + g * value.stride[1];
      std::memcpy(cache.arena + address.offset(page, in_page, g, false), k_src,
                  cache.head_dim * sizeof(T));
      std::memcpy(cache.arena + address.offset(page, in_page, g, true), v_src,
                  cache.head_dim * sizeof(T));
    }
  }
}

struct AttentionProblem {
  const TensorRef* out;
  const TensorRef* query;
  const TensorRef* query_seq;
  const TensorRef* query_pos;
  const TensorRef* block_table;
  const TensorRef* seq_lens;
  const float* sinks;  // [num_heads] or null
  int64_t sinks_stride;
  float scale;
  int32_t sliding_window;
};

template <typename T>
void attend_tokens(const AttentionProblem& p, const KvCacheView& cache, const KvAddress& address,
                   int64_t token_begin, int64_t token_end) {
  const int64_t num_heads = p.query->shape[1];
  const int64_t head_dim = cache.head_dim;
  const int64_t heads_per_kv = num_heads / cache.num_kv_heads;
  std::vector<float> q(head_dim), acc(head_dim), logits;
  for (int64_t t = token_begin; t < token_end; ++t) {
    const int64_t seq = int32_elem(*p.query_seq, t);
    const int64_t pos = int32_elem(*p.query_pos, t);
    const int64_t seq_len = int32_elem(*p.seq_lens, seq);
    const int64_t last = std::min(pos, seq_len - 1);
    const int64_t first =
        p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
    const int32_t* pages = static_cast<const int32_t*>(p.block_table->data) +
                           seq * p.block_table->stride[0];
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t kv_head = h / heads_per_kv;
      const T* q_src =
          static_cast<const T*>(p.query->data) + t * p.query->stride[0] + h * p.query->stride[1];
      load_row_as_float(q_src, head_dim, q.data());
      const int64_t num_keys = std::max<int64_t>(0, last - first + 1);
      logits.resize(static_cast<size_t>(num_keys));
      const float no_sink = -std::numeric_limits<float>::infinity();
      float max_logit = p.sinks ? p.sinks[h * p.sinks_stride] : no_sink;
      for (int64_t j = first; j <= last; ++j) {
        const int64_t page = pages[(j / cache.block_tokens) * p.block_table->stride[1]];
        const T* k_row = reinterpret_cast<const T*>(
            cache.arena + address.offset(page, j % cache.block_tokens, kv_head, false));
        float dot = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * to_float(k_row[d]);
        logits[j - first] = dot * p.scale;
        max_logit = std::max(max_logit, logits[j - first]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float denominator = p.sinks ? std::exp(p.sinks[h * p.sinks_stride] - max_logit) : 0.0f;
      for (int64_t j = first; j <= last; ++j) {
        const int64_t page = pages[(j / cache.block_tokens) * p.block_table->stride[1]];
        const T* v_row = reinterpret_cast<const T*>(
            cache.arena + address.offset(page, j % cache.block_tokens, kv_head, true));
        const float weight = std::exp(logits[j - first] - max_logit);
        denominator += weight;
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += weight * to_float(v_row[d]);
      }
      const float inv = num_keys > 0 && denominator > 0.0f ? 1.0f / denominator : 0.0f;
      T* o = static_cast<T*>(p.out->data) + t * p.out->stride[0] + h * p.out->stride[1];
      for (int64_t d = 0; d < head_dim; ++d) o[d] = from_float<T>(acc[d] * inv);
    }
  }
}

void fail(const std::string& problem) { kernels::throw_invalid("paged_attention", problem); }

}  // namespace

void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache) {
  const int64_t half_page = int64_t{cache.block_tokens} * cache.num_kv_heads * cache.head_dim;
  const KvAddress address{cache, static_cast<int64_t>(dtype_size(cache.dtype)), half_page};
  const auto* slots = static_cast<const int64_t*>(slot_mapping.data);
  for (int64_t t = 0; t < slot_mapping.shape[0]; ++t) {
    if (slots[t * slot_mapping.stride[0]] < -1) {
      kernels::throw_invalid("kv_cache_write",
                             "slot_mapping[" + std::to_string(t) + "] = " +
                                 std::to_string(slots[t * slot_mapping.stride[0]]) +
                                 " is negative but not -1");
    }
  }
  switch (cache.dtype) {
    case DType::kFloat32: write_tokens<float>(key, value, slot_mapping, cache, address); break;
    case DType::kFloat16: write_tokens<Half>(key, value, slot_mapping, cache, address); break;
    default: write_tokens<BFloat16>(key, value, slot_mapping, cache, address); break;
  }
}

void paged_attention(const PagedAttentionArgs& a) {
  const TensorRef &out = a.out, &query = a.query, &query_seq = a.query_seq,
                  &query_pos = a.query_pos, &block_table = a.block_table, &seq_lens = a.seq_lens;
  const KvCacheView& cache = a.cache;
  const int64_t num_tokens = query.shape[0];
  const int64_t num_seqs = seq_lens.shape[0];
  const int64_t max_blocks_per_seq = block_table.shape[1];
  // Check every index a token will follow before any thread starts.
  int64_t work = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t seq = int32_elem(query_seq, t);
    const int64_t pos = int32_elem(query_pos, t);
    if (seq < 0 || seq >= num_seqs) {
      fail("query_seq[" + std::to_string(t) + "] = " + std::to_string(seq) +
           " is outside [0, num_seqs = " + std::to_string(num_seqs) + ")");
    }
    if (pos < 0) fail("query_pos[" + std::to_string(t) + "] = " + std::to_string(pos) + " < 0");
    const int64_t seq_len = int32_elem(seq_lens, seq);
    if (seq_len < 0 || seq_len > max_blocks_per_seq * cache.block_tokens) {
      fail("seq_lens[" + std::to_string(seq) + "] = " + std::to_string(seq_len) +
           " is outside [0, max_blocks_per_seq * block_tokens = " +
           std::to_string(max_blocks_per_seq * cache.block_tokens) + "]");
    }
    work += std::min(pos + 1, seq_len) * query.shape[1] * cache.head_dim * 2;
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t used_blocks =
        (int64_t{int32_elem(seq_lens, s)} + cache.block_tokens - 1) / cache.block_tokens;
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int32_t page =
          static_cast<const int32_t*>(block_table.data)[s * block_table.stride[0] +
                                                        b * block_table.stride[1]];
      if (page < 0) {
        fail("block_table[" + std::to_string(s) + ", " + std::to_string(b) + "] = " +
             std::to_string(page) + " is negative but the block holds cached tokens");
      }
    }
  }

  const int64_t half_page = int64_t{cache.block_tokens} * cache.num_kv_heads * cache.head_dim;
  const KvAddress address{cache, static_cast<int64_t>(dtype_size(cache.dtype)), half_page};
  AttentionProblem problem{&out,       &query,    &query_seq, &query_pos, &block_table,
                           &seq_lens,  nullptr,   0,          a.scale,    a.sliding_window};
  if (!kernels::is_absent(a.sinks)) {
    problem.sinks = static_cast<const float*>(a.sinks.data);
    problem.sinks_stride = a.sinks.stride[0];
  }
  auto body = [&](int64_t begin, int64_t end) {
    switch (cache.dtype) {
      case DType::kFloat32: attend_tokens<float>(problem, cache, address, begin, end); break;
      case DType::kFloat16: attend_tokens<Half>(problem, cache, address, begin, end); break;
      default: attend_tokens<BFloat16>(problem, cache, address, begin, end); break;
    }
  };
  parallel_for(num_tokens, work, body);
}

}  // namespace moelora::cpu
