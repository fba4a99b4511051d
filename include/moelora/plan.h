// The plan of a step: every choice of kernel, form, tile, cluster and split that the ops make,
// decided once from the step's shape and the device (flashinfer's plan/run). The caller plans
// once per step and hands the plan to every op of that step; an op given no plan plans its own
// call the same way. The kernels and launchers do not re-decide: they read the plan, and derive
// only what depends on the compiled kernel (its occupancy) or on pointers (16-byte alignment)
// through the rules in src/plan_rules.h. Why each rule is what it is: docs/performance.md.
//
// Experiments and tests change a choice through PlanOverrides, never through scattered
// environment variables. For debugging, MOELORA_PLAN="key=value,..." (the same keys as
// PlanOverrides::parse) applies under every plan's typed overrides (docs/debugging.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "moelora/dtype.h"
#include "moelora/tensor_ref.h"

namespace moelora {

// What a device offers that the plan depends on. The CPU has zeros.
struct DeviceProps {
  DeviceKind kind = DeviceKind::kCPU;
  int32_t sm_count = 0;
  int32_t cc_major = 0;             // compute capability, major version
  bool cooperative_launch = false;  // grid-wide barriers (the multi-CTA align)
};

// The properties of CUDA device `index` (-1: the current device; read once per device), or the
// CPU's.
DeviceProps device_props(DeviceKind kind, int index = 0);

// ---- choices ----------------------------------------------------------------------------------
// unsorted: fused_moe_lora_unsorted, one work item per pair, no moe_lora_align launch;
// grouped:  moe_lora_align, then fused_moe_lora over blocks sharing (adapter, expert).
enum class LoraForm : uint8_t { kUnsorted, kGrouped };
// The grouped form's kernel family: one thread-block cluster per block (decode.cu), tensor-core
// tiles (prefill.cu), or the split-K CUDA-core fallback (fallback.cu).
enum class LoraKernel : uint8_t { kCluster, kMma, kSplitK };
enum class AlignKernel : uint8_t { kSingleCta, kMultiCta };
// paged_attention's kernels in the order they are tried: a kernel the shape does not fit passes
// the call to the next one.
enum class AttentionKernel : uint8_t { kMma, kGqa, kPerHead };
// How a prefill span (a sequence with several new tokens) attends: torch SDPA over its gathered
// prefix, or the paged kernel like decode tokens.
enum class PrefillAttention : uint8_t { kSdpa, kPaged };

const char* to_string(LoraForm v);
const char* to_string(LoraKernel v);
const char* to_string(AlignKernel v);
const char* to_string(AttentionKernel v);
const char* to_string(PrefillAttention v);

// Forced choices; an unset field leaves the rule's choice. Values are checked where set.
struct PlanOverrides {
  std::optional<LoraForm> form;
  std::optional<LoraKernel> lora_kernel;  // the grouped form's family, aligned or not
  int32_t block_m = 0;                    // rows per block of the grouped form; 0: the rule
  int32_t cluster_max = 0;  // widest decode cluster, 1..16 (above 8 non-portable); 0: the rule
  int32_t mma_split = 0;    // the tensor-core kernel's cluster split, 1..8; 0: the rule
  std::optional<AlignKernel> align_kernel;
  std::optional<bool> pdl;  // false: no programmatic dependent launch
  std::optional<AttentionKernel> attention_kernel;  // where the attention chain starts
  int32_t attention_splits = 0;  // split-KV factor, 1..8; 0: the rule
  std::optional<PrefillAttention> prefill_attention;

  // "key=value,key=value" with the field names above and the values to_string gives (pdl: 0 or
  // 1); InvalidArgument names a bad key or value.
  static PlanOverrides parse(const std::string& text);
  // Throws InvalidArgument for a field out of its range.
  void validate() const;
  // These overrides where set, `base` elsewhere.
  PlanOverrides over(const PlanOverrides& base) const;
  std::string describe() const;
};

// ---- LoRA ---------------------------------------------------------------------------------------
// A step's LoRA work at one kind of site, as the host knows it before any launch.
struct LoraStep {
  int64_t num_pairs = 0;     // (token, expert) pairs; rows at a dense site
  int32_t num_experts = 1;   // experts of the site's views (1 at a dense site)
  int32_t num_adapters = 0;  // distinct adapters among the step's tokens; 0: unknown
  bool dense = false;        // an attention projection or a dense model's site
  DType dtype = DType::kBFloat16;
};

struct LoraPlan {
  LoraForm form = LoraForm::kUnsorted;
  int32_t block_m = 16;                      // rows per block of the grouped form
  AlignKernel align = AlignKernel::kSingleCta;
  // The grouped form's family for 16-bit rows and columns that are 16-byte aligned, and for any
  // other call (float32, or rows or columns not 16-byte aligned: no tensor cores).
  LoraKernel kernel = LoraKernel::kCluster;
  LoraKernel unaligned_kernel = LoraKernel::kCluster;
  bool pdl = false;                          // programmatic dependent launch between kernels
  int32_t cluster_max = 0;  // widest decode cluster; 0: by the site's in_dim (plan_rules.h)
  int32_t mma_split = 0;    // tensor-core cluster split; 0: by the launch's shape (plan_rules.h)
  std::string describe() const;
};

LoraPlan plan_lora(const LoraStep& step, const DeviceProps& device,
                   const PlanOverrides& overrides = {});

// ---- attention ----------------------------------------------------------------------------------
// The shape of a step's paged attention (the same for every layer).
struct AttentionStep {
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t page_bytes = 0;
  int64_t max_context = 0;  // keys the block table can address (its width x block_tokens)
  DType dtype = DType::kBFloat16;
};

struct AttentionPlan {
  AttentionKernel kernel = AttentionKernel::kPerHead;  // the first kernel the shape fits
  int32_t splits = 0;  // split-KV factor; 0: by the launch's size (plan_rules.h)
  PrefillAttention prefill = PrefillAttention::kPaged;
  std::string describe() const;
};

AttentionPlan plan_attention(const AttentionStep& step, const DeviceProps& device,
                             const PlanOverrides& overrides = {});

}  // namespace moelora
