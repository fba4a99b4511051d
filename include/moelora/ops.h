// The kernels' contract. Every op takes views of caller-owned tensors, writes only into the
// outputs it is given, and runs on the device of its inputs: the CPU reference in src/kernels/
// (the semantics), or the CUDA kernel in cuda/ when the tensors are on a GPU. `stream` is a
// cudaStream_t (nullptr = the default stream); the CPU path ignores it.
//
// Notation: T tokens, K = top_k, P = T*K (token, k) pairs, pair p = t*K + k.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/row_layout.h"
#include "moelora/tensor_ref.h"

namespace moelora {

// ---- moe_lora_align ----------------------------------------------------------------------------
// Groups the pairs by (adapter slot, expert) into blocks of block_m rows, ordered by slot, then
// expert (the CPU then orders by pair id; a GPU kernel may order pairs within a group freely:
// the fused kernels do not depend on it). Pairs whose token has slot -1 (no adapter) are left out. Output sizes
// are fixed by the inputs' sizes (no host sync), so a decode step can be captured in a graph.
//   topk_ids      int32 [T, K] expert of each pair; an empty view means K = 1, expert 0 (dense)
//   token_slot    int32 [T]    adapter slot of each token in [0, num_slots), or -1
//   sorted_pairs  int32 [max_blocks * block_m] out: pair ids, padding = -1
//   block_slot    int32 [max_blocks] out: slot of each block, -1 past num_blocks
//   block_expert  int32 [max_blocks] out: expert of each block, -1 past num_blocks
//   num_blocks    int32 [1] out
// block_slot and block_expert may be longer than moe_lora_align_max_blocks (e.g. sized for the
// largest batch of a captured graph); sorted_pairs always holds block_m * len(block_slot).
// Out-of-range slot or expert ids are InvalidArgument on the CPU.
// max_blocks = max(1, (P + G * (block_m - 1)) / block_m) with G = min(P, num_slots * num_experts)
// (every non-empty group pads at most block_m - 1 rows).
//   workspace     optional, on token_slot's device, any dtype, contiguous, at least
//                 moe_lora_align_workspace_bytes: the GPU kernels' counters. Without it they
//                 allocate stream-ordered scratch, which inside a captured CUDA graph puts memory
//                 nodes between this launch and the next kernel (and costs that kernel its
//                 programmatic early start). Ignored on the CPU.
int64_t moe_lora_align_max_blocks(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                  int32_t block_m);
// Bytes of workspace moe_lora_align uses for num_pairs pairs on `device` (the current CUDA
// device for kCUDA; 0 on the CPU or when the call needs none).
int64_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                       DeviceKind device);
void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, void* stream,
                    const TensorRef& workspace = TensorRef{});

// ---- fused_moe_lora ----------------------------------------------------------------------------
// For each pair p in a block with slot a and expert e, and each slice i:
//   output[p, col_offsets[i] : col_offsets[i] + out_dim_i] +=
//       w[p] * (input[p / input_pairs_per_row] @ A_i[a, e]^T) @ B_i[a, e]^T
// where A_i rows and B_i^T rows are read through slices[i] (rank slices[i].rank(a); a slot of
// rank 0 at that site adds nothing), and w = topk_weights (float32 [P]) or 1 when it is empty.
//   w13: input = x [T, hidden], input_pairs_per_row = K, output = h13 [P, 2*inter],
//        slices = {gate, up}, col_offsets = {0, inter}, no weights.
//   w2:  input = h [P, inter], input_pairs_per_row = 1, output = y [P, hidden],
//        slices = {down}, col_offsets = {0}, weights = routing weights.
// input/output: float32, float16 or bfloat16 (same dtype as the weights); rows may be strided,
// the last dimension must be contiguous. Accumulation is in float32.
void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, void* stream,
                    int64_t active_slots = 0);

// ---- fused_moe_lora without alignment (decode) -------------------------------------------------
// The same delta as fused_moe_lora, for every pair p = t * K + k with slot = token_slot[t] and
// expert = topk_ids[t, k] (expert 0 when topk_ids is empty: dense rows, K = 1), without the
// moe_lora_align pass: at decode most (slot, expert) groups hold one pair, so grouping saves
// no weight traffic and its launch is pure latency. Pairs of slot -1 are untouched.
//   topk_ids    int32 [T, K] contiguous, or empty
//   token_slot  int32 [T]
//   input/output/topk_weights/slices/col_offsets as for fused_moe_lora; output has T*K rows.
// Out-of-range slot or expert ids are InvalidArgument on the CPU and add nothing on the GPU.
void fused_moe_lora_unsorted(const TensorRef& input, int32_t input_pairs_per_row,
                             const TensorRef& output, const TensorRef& topk_weights,
                             const TensorRef& topk_ids, const TensorRef& token_slot,
                             const std::vector<LoraSiteView>& slices,
                             const std::vector<int64_t>& col_offsets, void* stream);

// ---- dense multi-LoRA --------------------------------------------------------------------------
// Rows grouped by adapter by moe_lora_align with an empty topk_ids (one expert). For each row t
// in a block of slot a, and each slice i:
//   output[t, col_offsets[i] : + out_dim_i] += (input[t] @ A_i[a]^T) @ B_i[a]^T
void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream);

// ---- paged KV cache and attention --------------------------------------------------------------
// A KV page holds block_tokens tokens of one layer: K as [block_tokens][num_kv_heads][head_dim]
// followed by V in the same layout.
struct KvCacheView {
  std::byte* arena = nullptr;  // base of the pool's arena
  int64_t page_bytes = 0;
  int32_t block_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kFloat32;
};
// Bytes of K and V of one block, unpadded (the pool rounds pages up to its alignment).
int64_t kv_page_bytes_needed(int32_t block_tokens, int32_t num_kv_heads, int32_t head_dim,
                             DType dtype);

// Writes each token's K and V into its cache slot (page * block_tokens + offset in page);
// slot -1 skips the token.
//   key, value    [T, num_kv_heads, head_dim] (cache dtype)
//   slot_mapping  int64 [T]
void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream);

// Causal attention of each query token over its sequence's cached K/V.
//   out, query   [T, num_heads, head_dim]; num_heads is a multiple of num_kv_heads (GQA)
//   query_seq    int32 [T] sequence of each query token
//   query_pos    int32 [T] absolute position of each query token: it attends to cached
//                positions j <= query_pos (and j > query_pos - sliding_window when > 0)
//   block_table  int32 [num_seqs, max_blocks_per_seq] page of each block of each sequence
//   seq_lens     int32 [num_seqs] tokens cached per sequence (positions >= seq_len are unseen)
//   sinks        optional float32 [num_heads]: a per-head logit added to the softmax
//                denominator only (GPT-OSS attention sinks)
void paged_attention(const TensorRef& out, const TensorRef& query, const TensorRef& query_seq,
                     const TensorRef& query_pos, const TensorRef& block_table,
                     const TensorRef& seq_lens, const KvCacheView& cache, float scale,
                     int32_t sliding_window, const TensorRef& sinks, void* stream);

}  // namespace moelora
