// The kernels' contract. Every op takes views of caller-owned tensors, writes only into the
// outputs it is given, and runs on the device of its inputs: the CPU reference in src/kernels/
// (the semantics), or the CUDA kernel in cuda/ when the tensors are on a GPU. `stream` is a
// cudaStream_t (nullptr = the default stream); the CPU path ignores it. Every kernel choice
// comes from a plan (moelora/plan.h): the caller's, made once per step, or, given none, one made
// for the call.
//
// Notation: T tokens, K = top_k, P = T*K (token, k) pairs, pair p = t*K + k.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/plan.h"
#include "moelora/row_layout.h"
#include "moelora/tensor_ref.h"

namespace moelora {

// ---- moe_lora_align ----------------------------------------------------------------------------
// Groups the pairs by (adapter slot, expert) into blocks of block_m rows, ordered by slot, then
// expert (the CPU then orders by pair id; a GPU kernel may order pairs within a group freely:
// the fused kernels do not depend on it). Pairs whose token has slot -1 (no adapter) are left
// out. Output sizes are fixed by the inputs' sizes (no host sync), so a decode step can be
// captured in a graph. Out-of-range slot or expert ids are InvalidArgument on the CPU.
struct MoeLoraAlignArgs {
  TensorRef topk_ids;      // int32 [T, K] expert of each pair; absent: K = 1, expert 0 (dense)
  TensorRef token_slot;    // int32 [T] adapter slot of each token in [0, num_slots), or -1
  int32_t num_experts = 1;
  int32_t num_slots = 0;
  int32_t block_m = 0;
  TensorRef sorted_pairs;  // int32 [max_blocks * block_m] out: pair ids, padding = -1
  TensorRef block_slot;    // int32 [max_blocks] out: slot of each block, -1 past num_blocks
  TensorRef block_expert;  // int32 [max_blocks] out: expert of each block, -1 past num_blocks
  TensorRef num_blocks;    // int32 [1] out
  // Optional, on token_slot's device, any dtype, contiguous, at least
  // moe_lora_align_workspace_bytes: the GPU kernels' counters. Without it they allocate
  // stream-ordered scratch, which inside a captured CUDA graph puts memory nodes between this
  // launch and the next kernel (and costs that kernel its programmatic early start). Ignored on
  // the CPU.
  TensorRef workspace;
};
// block_slot and block_expert may be longer than moe_lora_align_max_blocks (e.g. sized for the
// largest batch of a captured graph); sorted_pairs always holds block_m * len(block_slot).
// max_blocks = max(1, (P + G * (block_m - 1)) / block_m) with G = min(P, num_slots * num_experts)
// (every non-empty group pads at most block_m - 1 rows).
int64_t moe_lora_align_max_blocks(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                  int32_t block_m);
// Bytes of workspace moe_lora_align uses for num_pairs pairs on `device` with the align kernel
// of `plan` (nullptr: the plan of that call; the current CUDA device for kCUDA; 0 on the CPU or
// when the call needs none).
int64_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                       DeviceKind device, const LoraPlan* plan = nullptr);
// `plan` picks the kernel and PDL (nullptr: plan_lora of this call's shape).
void moe_lora_align(const MoeLoraAlignArgs& args, void* stream, const LoraPlan* plan = nullptr);

// ---- the LoRA delta: fused_moe_lora, fused_moe_lora_unsorted, dense_lora -----------------------
// One argument struct for the three ops; each reads the fields of its form.
// For each pair p and each slice i, with slot a and expert e of p:
//   output[p, col_offsets[i] : col_offsets[i] + out_dim_i] +=
//       w[p] * (input[p / input_pairs_per_row] @ A_i[a, e]^T) @ B_i[a, e]^T
// where A_i rows and B_i^T rows are read through slices[i] (rank slices[i].rank(a); a slot of
// rank 0 at that site adds nothing), and w = topk_weights or 1 when it is absent.
//   w13: input = x [T, hidden], input_pairs_per_row = K, output = h13 [P, 2*inter],
//        slices = {gate, up}, col_offsets = {0, inter}, no weights.
//   w2:  input = h [P, inter], input_pairs_per_row = 1, output = y [P, hidden],
//        slices = {down}, col_offsets = {0}, weights = routing weights.
// input/output: float32, float16 or bfloat16 (same dtype as the weights); rows may be strided,
// the last dimension must be contiguous. Accumulation is in float32.
struct FusedMoeLoraArgs {
  TensorRef input;  // [rows, in_dim]
  int32_t input_pairs_per_row = 1;
  TensorRef output;        // [P, width]
  TensorRef topk_weights;  // optional float32 [P]
  // grouped form (fused_moe_lora, dense_lora): moe_lora_align's outputs and its block_m
  TensorRef sorted_pairs;  // int32 [max_blocks * block_m]; sorted rows for dense_lora
  TensorRef block_slot;    // int32 [max_blocks]
  TensorRef block_expert;  // int32 [max_blocks]; absent for dense_lora
  TensorRef num_blocks;    // int32 [1]
  int32_t block_m = 0;
  // unsorted form (fused_moe_lora_unsorted): the routing itself
  TensorRef topk_ids;    // int32 [T, K] contiguous, or absent (expert 0: dense rows, K = 1)
  TensorRef token_slot;  // int32 [T]
  std::vector<LoraSiteView> slices;
  std::vector<int64_t> col_offsets;  // one per slice
  // Distinct adapter slots among the pairs, when the caller knows them (0: unknown): sizes a
  // grouped GPU launch to the blocks those slots can fill rather than to every slot of the views.
  // Results never depend on it.
  int64_t active_slots = 0;
};

// The grouped form: every pair of a block shares (slot, expert).
void fused_moe_lora(const FusedMoeLoraArgs& args, void* stream, const LoraPlan* plan = nullptr);

// Without alignment (decode): pair p = t * K + k uses slot token_slot[t] and expert topk_ids[t, k]
// (expert 0 when topk_ids is absent: dense rows, K = 1). At decode most (slot, expert) groups
// hold one pair, so grouping saves no weight traffic and its launch is pure latency. Pairs of
// slot -1 are untouched; output has T*K rows. Out-of-range slot or expert ids are
// InvalidArgument on the CPU and add nothing on the GPU.
void fused_moe_lora_unsorted(const FusedMoeLoraArgs& args, void* stream,
                             const LoraPlan* plan = nullptr);

// Dense multi-LoRA: rows grouped by adapter by moe_lora_align with an absent topk_ids (one
// expert), no weights, one input row per output row. For each row t in a block of slot a:
//   output[t, col_offsets[i] : + out_dim_i] += (input[t] @ A_i[a]^T) @ B_i[a]^T
void dense_lora(const FusedMoeLoraArgs& args, void* stream, const LoraPlan* plan = nullptr);

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
struct PagedAttentionArgs {
  TensorRef out;    // [T, num_heads, head_dim]; num_heads is a multiple of num_kv_heads (GQA)
  TensorRef query;  // [T, num_heads, head_dim]
  TensorRef query_seq;    // int32 [T] sequence of each query token
  // int32 [T] absolute position of each query token: it attends to cached positions j <= query_pos
  // (and j > query_pos - sliding_window when > 0)
  TensorRef query_pos;
  TensorRef block_table;  // int32 [num_seqs, max_blocks_per_seq] page of each block of each seq
  TensorRef seq_lens;     // int32 [num_seqs] tokens cached per sequence (later ones unseen)
  KvCacheView cache;
  float scale = 1.0f;
  int32_t sliding_window = 0;  // 0: off
  // optional float32 [num_heads]: a per-head logit added to the softmax denominator only
  // (GPT-OSS attention sinks)
  TensorRef sinks;
};
// `plan` picks the kernel and split-KV (nullptr: plan_attention of this call's shape).
void paged_attention(const PagedAttentionArgs& args, void* stream,
                     const AttentionPlan* plan = nullptr);

}  // namespace moelora
