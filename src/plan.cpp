// The plan's rules (include/moelora/plan.h, src/plan_rules.h) and every threshold they use. Each
// constant states its rule; the measurements behind it are in docs/performance.md, under the
// heading named in its comment.
#include "moelora/plan.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "moelora/error.h"
#include "moelora/ops.h"
#include "plan_rules.h"

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda_check.h"
#endif

namespace moelora {

namespace {

// ---- form and block size ("Unsorted below 512 pairs", "Block sizes") ---------------------------
constexpr int64_t kGroupedFromPairs = 512;        // MoE sites: unsorted below this many pairs
constexpr int64_t kGroupedMinPairsPerGroup = 2;   // from it, grouped while groups hold >= 2
constexpr int64_t kGroupedMinPairsPerExpert = 64; // few experts: grouped from 64 pairs an expert
constexpr int64_t kUnsortedMaxDenseRows = 256;    // dense sites: unsorted up to this many rows
constexpr int32_t kBlockMSmall = 16;              // 1-warp CTAs, little padding
constexpr int32_t kBlockMLarge = 64;              // the tensor-core kernel's 4-warp M tile
constexpr int64_t kLargeBlockPairsPerGroup = 8;   // 64-row blocks above 8 pairs a group
constexpr int32_t kDenseBlockM = 16;

// ---- kernels ("Kernel families", "Alignment: one CTA or many") ---------------------------------
constexpr int64_t kMmaMinPairs = 512;        // grouped calls from here run on tensor cores
constexpr int64_t kMultiCtaMinPairs = 4096;  // the cooperative align from here

// ---- decode kernel shape ("Decode cluster shape") ----------------------------------------------
constexpr int64_t kMinInputPerCta = 256;   // input elements a CTA keeps when C CTAs split in_dim
constexpr int64_t kMaxPiece = 2048;        // input elements staged per pass
constexpr int kMaxColumnGroups = 16;
constexpr int kMinVectorsPerCta = 32;      // column vectors a CTA keeps when groups split

// ---- tensor-core cluster split ("Tensor-core cluster split") -----------------------------------
// CTAs per SM the split aims for by CTA width (1..4 warps), the splits it picks from, its cap
// (the portable cluster size) and the fewest K chunks / column tiles a part keeps. Fitted on the
// H200 over four model shapes.
constexpr double kTargetCtasPerSm[] = {0.0, 8.0, 6.0, 5.0, 4.0};
constexpr int32_t kSplitChoices[] = {1, 2, 3, 6, 8};
constexpr int32_t kMaxMmaSplit = 8;
constexpr int64_t kMinTilesPerPart = 4;
constexpr int kMaxMmaWarps = 4;

// ---- attention ("Attention kernels", "Split-KV") ------------------------------------------------
constexpr int32_t kMaxAttentionSplits = 8;  // the portable cluster size

bool prefers_unsorted(const LoraStep& s) {
  if (s.dense) return s.num_pairs <= kUnsortedMaxDenseRows;
  if (s.num_experts > 0 && s.num_pairs >= kGroupedMinPairsPerExpert * s.num_experts) return false;
  if (s.num_pairs < kGroupedFromPairs) return true;
  if (s.num_experts > 0 && s.num_adapters > 0) {
    return s.num_pairs < kGroupedMinPairsPerGroup * s.num_experts * s.num_adapters;
  }
  return false;
}

int32_t grouped_block_m(const LoraStep& s) {
  if (s.dense) return kDenseBlockM;
  const int64_t groups = std::max<int64_t>(1, int64_t{std::max(s.num_adapters, 1)} * s.num_experts);
  return s.num_pairs > kLargeBlockPairsPerGroup * groups ? kBlockMLarge : kBlockMSmall;
}

[[noreturn]] void bad_value(const std::string& key, const std::string& value,
                            const char* allowed) {
  throw InvalidArgument("plan override " + key + " must be " + allowed + ", got '" + value + "'");
}

int32_t parse_int(const std::string& key, const std::string& value, int32_t lo, int32_t hi) {
  char* end = nullptr;
  const long n = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || n < lo || n > hi) {
    bad_value(key, value, ("an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                           "]").c_str());
  }
  return static_cast<int32_t>(n);
}

void check_range(const char* key, int32_t value, int32_t hi) {
  if (value < 0 || value > hi) {
    throw InvalidArgument(std::string("plan override ") + key + " must be in [1, " +
                          std::to_string(hi) + "] (0: the rule's choice), got " +
                          std::to_string(value));
  }
}

template <typename E>
std::string optional_name(const std::optional<E>& v) {
  return v ? to_string(*v) : "auto";
}

}  // namespace

const char* to_string(LoraForm v) { return v == LoraForm::kUnsorted ? "unsorted" : "grouped"; }

const char* to_string(LoraKernel v) {
  switch (v) {
    case LoraKernel::kCluster: return "cluster";
    case LoraKernel::kMma: return "mma";
    case LoraKernel::kSplitK: return "splitk";
  }
  return "?";
}

const char* to_string(AlignKernel v) { return v == AlignKernel::kSingleCta ? "single" : "multi"; }

const char* to_string(AttentionKernel v) {
  switch (v) {
    case AttentionKernel::kMma: return "mma";
    case AttentionKernel::kGqa: return "gqa";
    case AttentionKernel::kPerHead: return "per_head";
  }
  return "?";
}

const char* to_string(PrefillAttention v) {
  return v == PrefillAttention::kSdpa ? "sdpa" : "paged";
}

PlanOverrides PlanOverrides::parse(const std::string& text) {
  PlanOverrides o;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(',', at);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(at, end - at);
    at = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      throw InvalidArgument("plan override '" + item + "' must be key=value");
    }
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    const bool unset = value == "auto";
    if (key == "form") {
      if (value == "unsorted") o.form = LoraForm::kUnsorted;
      else if (value == "grouped") o.form = LoraForm::kGrouped;
      else if (!unset) bad_value(key, value, "unsorted, grouped or auto");
    } else if (key == "lora_kernel") {
      if (value == "cluster") o.lora_kernel = LoraKernel::kCluster;
      else if (value == "mma") o.lora_kernel = LoraKernel::kMma;
      else if (value == "splitk") o.lora_kernel = LoraKernel::kSplitK;
      else if (!unset) bad_value(key, value, "cluster, mma, splitk or auto");
    } else if (key == "align_kernel") {
      if (value == "single") o.align_kernel = AlignKernel::kSingleCta;
      else if (value == "multi") o.align_kernel = AlignKernel::kMultiCta;
      else if (!unset) bad_value(key, value, "single, multi or auto");
    } else if (key == "attention_kernel") {
      if (value == "mma") o.attention_kernel = AttentionKernel::kMma;
      else if (value == "gqa") o.attention_kernel = AttentionKernel::kGqa;
      else if (value == "per_head") o.attention_kernel = AttentionKernel::kPerHead;
      else if (!unset) bad_value(key, value, "mma, gqa, per_head or auto");
    } else if (key == "prefill_attention") {
      if (value == "sdpa") o.prefill_attention = PrefillAttention::kSdpa;
      else if (value == "paged") o.prefill_attention = PrefillAttention::kPaged;
      else if (!unset) bad_value(key, value, "sdpa, paged or auto");
    } else if (key == "pdl") {
      if (value == "1") o.pdl = true;
      else if (value == "0") o.pdl = false;
      else if (!unset) bad_value(key, value, "0, 1 or auto");
    } else if (key == "block_m") {
      o.block_m = unset ? 0 : parse_int(key, value, 1, 1 << 20);
    } else if (key == "cluster_max") {
      o.cluster_max = unset ? 0 : parse_int(key, value, 1, plan_rules::kMaxNonPortableCluster);
    } else if (key == "mma_split") {
      o.mma_split = unset ? 0 : parse_int(key, value, 1, kMaxMmaSplit);
    } else if (key == "attention_splits") {
      o.attention_splits = unset ? 0 : parse_int(key, value, 1, kMaxAttentionSplits);
    } else {
      throw InvalidArgument("unknown plan override '" + key + "' (keys: form, lora_kernel, "
                            "block_m, cluster_max, mma_split, align_kernel, pdl, "
                            "attention_kernel, attention_splits, prefill_attention)");
    }
  }
  return o;
}

void PlanOverrides::validate() const {
  if (block_m < 0) {
    throw InvalidArgument("plan override block_m must be positive (0: the rule's choice), got " +
                          std::to_string(block_m));
  }
  check_range("cluster_max", cluster_max, plan_rules::kMaxNonPortableCluster);
  check_range("mma_split", mma_split, kMaxMmaSplit);
  check_range("attention_splits", attention_splits, kMaxAttentionSplits);
}

PlanOverrides PlanOverrides::over(const PlanOverrides& base) const {
  PlanOverrides o = *this;
  if (!o.form) o.form = base.form;
  if (!o.lora_kernel) o.lora_kernel = base.lora_kernel;
  if (o.block_m == 0) o.block_m = base.block_m;
  if (o.cluster_max == 0) o.cluster_max = base.cluster_max;
  if (o.mma_split == 0) o.mma_split = base.mma_split;
  if (!o.align_kernel) o.align_kernel = base.align_kernel;
  if (!o.pdl) o.pdl = base.pdl;
  if (!o.attention_kernel) o.attention_kernel = base.attention_kernel;
  if (o.attention_splits == 0) o.attention_splits = base.attention_splits;
  if (!o.prefill_attention) o.prefill_attention = base.prefill_attention;
  return o;
}

std::string PlanOverrides::describe() const {
  return "form=" + optional_name(form) + ",lora_kernel=" + optional_name(lora_kernel) +
         ",block_m=" + (block_m > 0 ? std::to_string(block_m) : "auto") +
         ",cluster_max=" + (cluster_max > 0 ? std::to_string(cluster_max) : "auto") +
         ",mma_split=" + (mma_split > 0 ? std::to_string(mma_split) : "auto") +
         ",align_kernel=" + optional_name(align_kernel) +
         ",pdl=" + (pdl ? (*pdl ? "1" : "0") : "auto") +
         ",attention_kernel=" + optional_name(attention_kernel) +
         ",attention_splits=" + (attention_splits > 0 ? std::to_string(attention_splits) : "auto") +
         ",prefill_attention=" + optional_name(prefill_attention);
}

std::string LoraPlan::describe() const {
  return std::string("LoraPlan(form=") + to_string(form) + ", block_m=" +
         std::to_string(block_m) + ", align=" + to_string(align) + ", kernel=" +
         to_string(kernel) + ", unaligned_kernel=" + to_string(unaligned_kernel) +
         ", pdl=" + (pdl ? "1" : "0") + ", cluster_max=" + std::to_string(cluster_max) +
         ", mma_split=" + std::to_string(mma_split) + ")";
}

std::string AttentionPlan::describe() const {
  return std::string("AttentionPlan(kernel=") + to_string(kernel) + ", splits=" +
         std::to_string(splits) + ", prefill=" + to_string(prefill) + ")";
}

DeviceProps device_props(DeviceKind kind, int index) {
  if (kind != DeviceKind::kCUDA) return DeviceProps{};
#ifdef MOELORA_WITH_CUDA
  if (index < 0) MOELORA_CUDA_CHECK(cudaGetDevice(&index));
  static std::mutex mutex;
  static std::map<int, DeviceProps> known;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = known.find(index); found != known.end()) return found->second;
  DeviceProps p;
  p.kind = DeviceKind::kCUDA;
  int value = 0;
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, index));
  p.sm_count = value;
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrComputeCapabilityMajor, index));
  p.cc_major = value;
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrCooperativeLaunch, index));
  p.cooperative_launch = value != 0;
  known.emplace(index, p);
  return p;
#else
  throw InvalidArgument("device_props: this build of libmoelora has no CUDA backend");
#endif
}

LoraPlan plan_lora(const LoraStep& step, const DeviceProps& device,
                   const PlanOverrides& overrides) {
  if (step.num_pairs < 0 || step.num_experts < 0 || step.num_adapters < 0) {
    throw InvalidArgument("plan_lora: num_pairs, num_experts and num_adapters must be >= 0, got " +
                          std::to_string(step.num_pairs) + ", " + std::to_string(step.num_experts) +
                          " and " + std::to_string(step.num_adapters));
  }
  overrides.validate();
  const PlanOverrides o = overrides.over(plan_rules::environment_overrides());
  LoraPlan p;
  p.form = o.form.value_or(prefers_unsorted(step) ? LoraForm::kUnsorted : LoraForm::kGrouped);
  p.block_m = o.block_m > 0 ? o.block_m : grouped_block_m(step);
  p.align = o.align_kernel.value_or(step.num_pairs >= kMultiCtaMinPairs ? AlignKernel::kMultiCta
                                                                         : AlignKernel::kSingleCta);
  // Tensor cores need 16-bit elements and 16-byte rows; other layouts take the cluster kernel.
  const bool tensor_cores = step.dtype != DType::kFloat32 && step.num_pairs >= kMmaMinPairs;
  p.kernel = o.lora_kernel.value_or(tensor_cores ? LoraKernel::kMma : LoraKernel::kCluster);
  p.unaligned_kernel = o.lora_kernel.value_or(LoraKernel::kCluster);
  p.pdl = o.pdl.value_or(true) && device.kind == DeviceKind::kCUDA && device.cc_major >= 9;
  p.cluster_max = o.cluster_max;
  p.mma_split = o.mma_split;
  return p;
}

AttentionPlan plan_attention(const AttentionStep& step, const DeviceProps& device,
                             const PlanOverrides& overrides) {
  overrides.validate();
  const PlanOverrides o = overrides.over(plan_rules::environment_overrides());
  AttentionPlan p;
  p.kernel = o.attention_kernel.value_or(AttentionKernel::kMma);
  while (p.kernel != AttentionKernel::kPerHead &&
         !plan_rules::attention_kernel_fits(p.kernel, step, device)) {
    p.kernel = static_cast<AttentionKernel>(static_cast<int>(p.kernel) + 1);
  }
  p.splits = o.attention_splits;
  p.prefill = o.prefill_attention.value_or(device.kind == DeviceKind::kCUDA
                                               ? PrefillAttention::kPaged
                                               : PrefillAttention::kSdpa);
  return p;
}

namespace plan_rules {

const PlanOverrides& environment_overrides() {
  static const PlanOverrides parsed = [] {
    const char* text = std::getenv("MOELORA_PLAN");
    PlanOverrides o = text != nullptr ? PlanOverrides::parse(text) : PlanOverrides{};
    o.validate();
    return o;
  }();
  return parsed;
}

int32_t decode_cluster_limit(int64_t in_dim, const LoraPlan& plan, const DeviceProps& device) {
  if (device.cc_major < 9) return 1;  // clusters exist from sm_90 on
  if (plan.cluster_max > 0) return plan.cluster_max;
  return in_dim >= kMaxNonPortableCluster * kMinInputPerCta ? kMaxNonPortableCluster
                                                            : kMaxPortableCluster;
}

int64_t decode_piece(int64_t in_dim, int cluster_size) {
  const int64_t share = (in_dim + cluster_size - 1) / cluster_size;
  return std::min<int64_t>(kMaxPiece, (share + 7) / 8 * 8);
}

DecodeShape decode_shape(int64_t in_dim, int64_t out_width, int elem_bytes, int vec_bytes,
                         int64_t num_items, int32_t cluster_limit,
                         const ResidentClusters& resident) {
  const int64_t resident_ctas = std::max<int64_t>(1, resident(1, decode_piece(in_dim, 1)));
  // Rounded down: a partial second wave costs more than idle SMs.
  const int64_t wanted = std::max<int64_t>(1, resident_ctas / num_items);
  const int64_t by_input = std::max<int64_t>(1, in_dim / kMinInputPerCta);
  DecodeShape shape{};
  shape.cluster_size = static_cast<int>(
      std::max<int64_t>(1, std::min({wanted, by_input, int64_t{cluster_limit}})));
  // A cluster's CTAs share a GPC, so fewer clusters fit than resident CTAs / C: ask.
  while (shape.cluster_size > 1 &&
         resident(shape.cluster_size, decode_piece(in_dim, shape.cluster_size)) < num_items) {
    shape.cluster_size = shape.cluster_size > kMaxPortableCluster ? kMaxPortableCluster
                                                                  : shape.cluster_size - 1;
  }
  shape.piece = decode_piece(in_dim, shape.cluster_size);
  shape.resident_clusters = std::max<int64_t>(1, resident(shape.cluster_size, shape.piece));
  const int64_t out_vecs = out_width * elem_bytes / vec_bytes;
  const int64_t groups = out_vecs / (int64_t{kMinVectorsPerCta} * shape.cluster_size);
  const int64_t by_wave = std::max<int64_t>(1, shape.resident_clusters / num_items);
  shape.column_groups = static_cast<int>(
      std::clamp<int64_t>(std::min(groups, by_wave), 1, kMaxColumnGroups));
  return shape;
}

int64_t launch_blocks(int64_t max_blocks, int64_t num_pairs, int32_t num_experts,
                      int64_t active_slots, int32_t block_m) {
  if (active_slots <= 0) return max_blocks;
  const auto slots = static_cast<int32_t>(std::min<int64_t>(active_slots, INT32_MAX));
  return std::min(max_blocks, moe_lora_align_max_blocks(num_pairs, num_experts, slots, block_m));
}

int64_t expected_blocks(int64_t num_pairs, int64_t slots, int32_t num_experts, int32_t block_m,
                        int64_t bound) {
  // G groups receive G (1 - e^(-P/G)) pairs' worth of first blocks, and the rows fill about
  // P / block_m more; the bound alone counts a padded block for every group.
  const double groups = static_cast<double>(std::max<int64_t>(slots, 1) * num_experts);
  const double pairs = static_cast<double>(num_pairs);
  const double filled = groups * -std::expm1(-pairs / groups) + pairs / block_m;
  return std::clamp<int64_t>(static_cast<int64_t>(filled), 1, std::max<int64_t>(bound, 1));
}

int32_t mma_cluster_split(const MmaSplitShape& shape, const LoraPlan& plan,
                          const DeviceProps& device) {
  if (device.cc_major < 9) return 1;
  if (plan.mma_split > 0) return plan.mma_split;
  const int64_t cap = std::clamp<int64_t>(std::min(shape.widest_tiles, shape.k_chunks) /
                                              kMinTilesPerPart,
                                          1, kMaxMmaSplit);
  const double wanted = kTargetCtasPerSm[std::clamp(shape.warps, 1, kMaxMmaWarps)] *
                        device.sm_count /
                        static_cast<double>(std::max<int64_t>(shape.expected_items, 1));
  // The nearest choice within the cap by ratio (1 for 2 costs what 3 for 6 does); ties: the
  // smaller.
  const auto distance = [wanted](int32_t choice) {
    return std::abs(std::log(static_cast<double>(choice) / wanted));
  };
  int32_t split = 1;
  for (const int32_t choice : kSplitChoices) {
    if (choice <= cap && distance(choice) < distance(split)) split = choice;
  }
  return split;
}

bool attention_kernel_fits(AttentionKernel kernel, const AttentionStep& s,
                           const DeviceProps& device) {
  const bool half = s.dtype == DType::kFloat16 || s.dtype == DType::kBFloat16;
  const bool gqa = s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0;
  const int32_t ratio = gqa ? s.num_heads / s.num_kv_heads : 0;
  switch (kernel) {
    case AttentionKernel::kMma:  // mma.sync on bf16 and cp.async: sm_80 on
      return half && device.cc_major >= 8 && (s.head_dim == 64 || s.head_dim == 128) && gqa &&
             ratio <= 16 && s.page_bytes % 16 == 0 && s.max_context <= (int64_t{1} << 30);
    case AttentionKernel::kGqa: {
      const int64_t vectors = int64_t{s.head_dim} * 2 / 16;  // 16-byte vectors of a row
      return half && (s.head_dim * 2) % 16 == 0 &&
             (vectors == 8 || vectors == 16 || vectors == 32) && gqa && ratio <= 8 &&
             s.page_bytes % 16 == 0;
    }
    case AttentionKernel::kPerHead:
      return true;
  }
  return false;
}

int32_t attention_splits(int64_t ctas, int64_t max_context, int64_t resident_ctas,
                         const AttentionPlan& plan, const DeviceProps& device) {
  if (device.cc_major < 9) return 1;
  if (plan.splits > 0) return plan.splits;
  const int64_t wanted = resident_ctas > 0 ? resident_ctas / ctas  // at most one wave
                                           : (2 * int64_t{device.sm_count} + ctas - 1) / ctas;
  const int64_t by_keys = std::max<int64_t>(1, max_context / kMinKeysPerSplit);
  return static_cast<int32_t>(std::clamp<int64_t>(std::min(wanted, by_keys), 1,
                                                  kMaxAttentionSplits));
}

}  // namespace plan_rules

}  // namespace moelora
