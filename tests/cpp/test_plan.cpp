// The plan's decisions pinned for a table of step shapes on an H200-like device (132 SMs,
// sm_90). The expected values were computed from the rules as they stood when the plan took them
// over (form and block size in Python, kernel family, cluster shapes and splits in the CUDA
// launchers), so a change of any rule shows here as a changed row.
#include <algorithm>
#include <cstdint>
#include <string>

#include "moelora/error.h"
#include "moelora/ops.h"
#include "moelora/plan.h"
#include "plan_rules.h"
#include "test_harness.h"

using namespace moelora;

namespace {

DeviceProps h200() {
  DeviceProps d;
  d.kind = DeviceKind::kCUDA;
  d.sm_count = 132;
  d.cc_major = 9;
  d.cooperative_launch = true;
  return d;
}

struct StepRow {
  int64_t num_pairs;
  int32_t num_experts, num_adapters;
  bool dense, unsorted;
  int32_t block_m;
  bool multi_cta, mma;  // align kernel; grouped family for bf16 with aligned rows
};

const StepRow kSteps[] = {
    {4, 32, 0, false, true, 16, false, false},  // gpt-oss-20b 1 tokens
    {4, 32, 1, false, true, 16, false, false},  // gpt-oss-20b 1 tokens
    {4, 32, 4, false, true, 16, false, false},  // gpt-oss-20b 1 tokens
    {4, 32, 16, false, true, 16, false, false},  // gpt-oss-20b 1 tokens
    {32, 32, 0, false, true, 16, false, false},  // gpt-oss-20b 8 tokens
    {32, 32, 1, false, true, 16, false, false},  // gpt-oss-20b 8 tokens
    {32, 32, 4, false, true, 16, false, false},  // gpt-oss-20b 8 tokens
    {32, 32, 16, false, true, 16, false, false},  // gpt-oss-20b 8 tokens
    {128, 32, 0, false, true, 16, false, false},  // gpt-oss-20b 32 tokens
    {128, 32, 1, false, true, 16, false, false},  // gpt-oss-20b 32 tokens
    {128, 32, 4, false, true, 16, false, false},  // gpt-oss-20b 32 tokens
    {128, 32, 16, false, true, 16, false, false},  // gpt-oss-20b 32 tokens
    {256, 32, 0, false, true, 16, false, false},  // gpt-oss-20b 64 tokens
    {256, 32, 1, false, true, 16, false, false},  // gpt-oss-20b 64 tokens
    {256, 32, 4, false, true, 16, false, false},  // gpt-oss-20b 64 tokens
    {256, 32, 16, false, true, 16, false, false},  // gpt-oss-20b 64 tokens
    {512, 32, 0, false, false, 64, false, true},  // gpt-oss-20b 128 tokens
    {512, 32, 1, false, false, 64, false, true},  // gpt-oss-20b 128 tokens
    {512, 32, 4, false, false, 16, false, true},  // gpt-oss-20b 128 tokens
    {512, 32, 16, false, true, 16, false, true},  // gpt-oss-20b 128 tokens
    {1024, 32, 0, false, false, 64, false, true},  // gpt-oss-20b 256 tokens
    {1024, 32, 1, false, false, 64, false, true},  // gpt-oss-20b 256 tokens
    {1024, 32, 4, false, false, 16, false, true},  // gpt-oss-20b 256 tokens
    {1024, 32, 16, false, false, 16, false, true},  // gpt-oss-20b 256 tokens
    {2048, 32, 0, false, false, 64, false, true},  // gpt-oss-20b 512 tokens
    {2048, 32, 1, false, false, 64, false, true},  // gpt-oss-20b 512 tokens
    {2048, 32, 4, false, false, 64, false, true},  // gpt-oss-20b 512 tokens
    {2048, 32, 16, false, false, 16, false, true},  // gpt-oss-20b 512 tokens
    {8192, 32, 0, false, false, 64, true, true},  // gpt-oss-20b 2048 tokens
    {8192, 32, 1, false, false, 64, true, true},  // gpt-oss-20b 2048 tokens
    {8192, 32, 4, false, false, 64, true, true},  // gpt-oss-20b 2048 tokens
    {8192, 32, 16, false, false, 64, true, true},  // gpt-oss-20b 2048 tokens
    {32768, 32, 0, false, false, 64, true, true},  // gpt-oss-20b 8192 tokens
    {32768, 32, 1, false, false, 64, true, true},  // gpt-oss-20b 8192 tokens
    {32768, 32, 4, false, false, 64, true, true},  // gpt-oss-20b 8192 tokens
    {32768, 32, 16, false, false, 64, true, true},  // gpt-oss-20b 8192 tokens
    {8, 128, 0, false, true, 16, false, false},  // qwen3-30b-a3b 1 tokens
    {8, 128, 1, false, true, 16, false, false},  // qwen3-30b-a3b 1 tokens
    {8, 128, 4, false, true, 16, false, false},  // qwen3-30b-a3b 1 tokens
    {8, 128, 16, false, true, 16, false, false},  // qwen3-30b-a3b 1 tokens
    {64, 128, 0, false, true, 16, false, false},  // qwen3-30b-a3b 8 tokens
    {64, 128, 1, false, true, 16, false, false},  // qwen3-30b-a3b 8 tokens
    {64, 128, 4, false, true, 16, false, false},  // qwen3-30b-a3b 8 tokens
    {64, 128, 16, false, true, 16, false, false},  // qwen3-30b-a3b 8 tokens
    {256, 128, 0, false, true, 16, false, false},  // qwen3-30b-a3b 32 tokens
    {256, 128, 1, false, true, 16, false, false},  // qwen3-30b-a3b 32 tokens
    {256, 128, 4, false, true, 16, false, false},  // qwen3-30b-a3b 32 tokens
    {256, 128, 16, false, true, 16, false, false},  // qwen3-30b-a3b 32 tokens
    {512, 128, 0, false, false, 16, false, true},  // qwen3-30b-a3b 64 tokens
    {512, 128, 1, false, false, 16, false, true},  // qwen3-30b-a3b 64 tokens
    {512, 128, 4, false, true, 16, false, true},  // qwen3-30b-a3b 64 tokens
    {512, 128, 16, false, true, 16, false, true},  // qwen3-30b-a3b 64 tokens
    {1024, 128, 0, false, false, 16, false, true},  // qwen3-30b-a3b 128 tokens
    {1024, 128, 1, false, false, 16, false, true},  // qwen3-30b-a3b 128 tokens
    {1024, 128, 4, false, false, 16, false, true},  // qwen3-30b-a3b 128 tokens
    {1024, 128, 16, false, true, 16, false, true},  // qwen3-30b-a3b 128 tokens
    {2048, 128, 0, false, false, 64, false, true},  // qwen3-30b-a3b 256 tokens
    {2048, 128, 1, false, false, 64, false, true},  // qwen3-30b-a3b 256 tokens
    {2048, 128, 4, false, false, 16, false, true},  // qwen3-30b-a3b 256 tokens
    {2048, 128, 16, false, true, 16, false, true},  // qwen3-30b-a3b 256 tokens
    {4096, 128, 0, false, false, 64, true, true},  // qwen3-30b-a3b 512 tokens
    {4096, 128, 1, false, false, 64, true, true},  // qwen3-30b-a3b 512 tokens
    {4096, 128, 4, false, false, 16, true, true},  // qwen3-30b-a3b 512 tokens
    {4096, 128, 16, false, false, 16, true, true},  // qwen3-30b-a3b 512 tokens
    {16384, 128, 0, false, false, 64, true, true},  // qwen3-30b-a3b 2048 tokens
    {16384, 128, 1, false, false, 64, true, true},  // qwen3-30b-a3b 2048 tokens
    {16384, 128, 4, false, false, 64, true, true},  // qwen3-30b-a3b 2048 tokens
    {16384, 128, 16, false, false, 16, true, true},  // qwen3-30b-a3b 2048 tokens
    {65536, 128, 0, false, false, 64, true, true},  // qwen3-30b-a3b 8192 tokens
    {65536, 128, 1, false, false, 64, true, true},  // qwen3-30b-a3b 8192 tokens
    {65536, 128, 4, false, false, 64, true, true},  // qwen3-30b-a3b 8192 tokens
    {65536, 128, 16, false, false, 64, true, true},  // qwen3-30b-a3b 8192 tokens
    {2, 8, 0, false, true, 16, false, false},  // mixtral-8x7b 1 tokens
    {2, 8, 1, false, true, 16, false, false},  // mixtral-8x7b 1 tokens
    {2, 8, 4, false, true, 16, false, false},  // mixtral-8x7b 1 tokens
    {2, 8, 16, false, true, 16, false, false},  // mixtral-8x7b 1 tokens
    {16, 8, 0, false, true, 16, false, false},  // mixtral-8x7b 8 tokens
    {16, 8, 1, false, true, 16, false, false},  // mixtral-8x7b 8 tokens
    {16, 8, 4, false, true, 16, false, false},  // mixtral-8x7b 8 tokens
    {16, 8, 16, false, true, 16, false, false},  // mixtral-8x7b 8 tokens
    {64, 8, 0, false, true, 16, false, false},  // mixtral-8x7b 32 tokens
    {64, 8, 1, false, true, 16, false, false},  // mixtral-8x7b 32 tokens
    {64, 8, 4, false, true, 16, false, false},  // mixtral-8x7b 32 tokens
    {64, 8, 16, false, true, 16, false, false},  // mixtral-8x7b 32 tokens
    {128, 8, 0, false, true, 64, false, false},  // mixtral-8x7b 64 tokens
    {128, 8, 1, false, true, 64, false, false},  // mixtral-8x7b 64 tokens
    {128, 8, 4, false, true, 16, false, false},  // mixtral-8x7b 64 tokens
    {128, 8, 16, false, true, 16, false, false},  // mixtral-8x7b 64 tokens
    {256, 8, 0, false, true, 64, false, false},  // mixtral-8x7b 128 tokens
    {256, 8, 1, false, true, 64, false, false},  // mixtral-8x7b 128 tokens
    {256, 8, 4, false, true, 16, false, false},  // mixtral-8x7b 128 tokens
    {256, 8, 16, false, true, 16, false, false},  // mixtral-8x7b 128 tokens
    {512, 8, 0, false, false, 64, false, true},  // mixtral-8x7b 256 tokens
    {512, 8, 1, false, false, 64, false, true},  // mixtral-8x7b 256 tokens
    {512, 8, 4, false, false, 64, false, true},  // mixtral-8x7b 256 tokens
    {512, 8, 16, false, false, 16, false, true},  // mixtral-8x7b 256 tokens
    {1024, 8, 0, false, false, 64, false, true},  // mixtral-8x7b 512 tokens
    {1024, 8, 1, false, false, 64, false, true},  // mixtral-8x7b 512 tokens
    {1024, 8, 4, false, false, 64, false, true},  // mixtral-8x7b 512 tokens
    {1024, 8, 16, false, false, 16, false, true},  // mixtral-8x7b 512 tokens
    {4096, 8, 0, false, false, 64, true, true},  // mixtral-8x7b 2048 tokens
    {4096, 8, 1, false, false, 64, true, true},  // mixtral-8x7b 2048 tokens
    {4096, 8, 4, false, false, 64, true, true},  // mixtral-8x7b 2048 tokens
    {4096, 8, 16, false, false, 64, true, true},  // mixtral-8x7b 2048 tokens
    {16384, 8, 0, false, false, 64, true, true},  // mixtral-8x7b 8192 tokens
    {16384, 8, 1, false, false, 64, true, true},  // mixtral-8x7b 8192 tokens
    {16384, 8, 4, false, false, 64, true, true},  // mixtral-8x7b 8192 tokens
    {16384, 8, 16, false, false, 64, true, true},  // mixtral-8x7b 8192 tokens
    {8, 64, 0, false, true, 16, false, false},  // olmoe-1b-7b 1 tokens
    {8, 64, 1, false, true, 16, false, false},  // olmoe-1b-7b 1 tokens
    {8, 64, 4, false, true, 16, false, false},  // olmoe-1b-7b 1 tokens
    {8, 64, 16, false, true, 16, false, false},  // olmoe-1b-7b 1 tokens
    {64, 64, 0, false, true, 16, false, false},  // olmoe-1b-7b 8 tokens
    {64, 64, 1, false, true, 16, false, false},  // olmoe-1b-7b 8 tokens
    {64, 64, 4, false, true, 16, false, false},  // olmoe-1b-7b 8 tokens
    {64, 64, 16, false, true, 16, false, false},  // olmoe-1b-7b 8 tokens
    {256, 64, 0, false, true, 16, false, false},  // olmoe-1b-7b 32 tokens
    {256, 64, 1, false, true, 16, false, false},  // olmoe-1b-7b 32 tokens
    {256, 64, 4, false, true, 16, false, false},  // olmoe-1b-7b 32 tokens
    {256, 64, 16, false, true, 16, false, false},  // olmoe-1b-7b 32 tokens
    {512, 64, 0, false, false, 16, false, true},  // olmoe-1b-7b 64 tokens
    {512, 64, 1, false, false, 16, false, true},  // olmoe-1b-7b 64 tokens
    {512, 64, 4, false, false, 16, false, true},  // olmoe-1b-7b 64 tokens
    {512, 64, 16, false, true, 16, false, true},  // olmoe-1b-7b 64 tokens
    {1024, 64, 0, false, false, 64, false, true},  // olmoe-1b-7b 128 tokens
    {1024, 64, 1, false, false, 64, false, true},  // olmoe-1b-7b 128 tokens
    {1024, 64, 4, false, false, 16, false, true},  // olmoe-1b-7b 128 tokens
    {1024, 64, 16, false, true, 16, false, true},  // olmoe-1b-7b 128 tokens
    {2048, 64, 0, false, false, 64, false, true},  // olmoe-1b-7b 256 tokens
    {2048, 64, 1, false, false, 64, false, true},  // olmoe-1b-7b 256 tokens
    {2048, 64, 4, false, false, 16, false, true},  // olmoe-1b-7b 256 tokens
    {2048, 64, 16, false, false, 16, false, true},  // olmoe-1b-7b 256 tokens
    {4096, 64, 0, false, false, 64, true, true},  // olmoe-1b-7b 512 tokens
    {4096, 64, 1, false, false, 64, true, true},  // olmoe-1b-7b 512 tokens
    {4096, 64, 4, false, false, 64, true, true},  // olmoe-1b-7b 512 tokens
    {4096, 64, 16, false, false, 16, true, true},  // olmoe-1b-7b 512 tokens
    {16384, 64, 0, false, false, 64, true, true},  // olmoe-1b-7b 2048 tokens
    {16384, 64, 1, false, false, 64, true, true},  // olmoe-1b-7b 2048 tokens
    {16384, 64, 4, false, false, 64, true, true},  // olmoe-1b-7b 2048 tokens
    {16384, 64, 16, false, false, 64, true, true},  // olmoe-1b-7b 2048 tokens
    {65536, 64, 0, false, false, 64, true, true},  // olmoe-1b-7b 8192 tokens
    {65536, 64, 1, false, false, 64, true, true},  // olmoe-1b-7b 8192 tokens
    {65536, 64, 4, false, false, 64, true, true},  // olmoe-1b-7b 8192 tokens
    {65536, 64, 16, false, false, 64, true, true},  // olmoe-1b-7b 8192 tokens
    {1, 1, 4, true, true, 16, false, false},  // dense
    {64, 1, 4, true, true, 16, false, false},  // dense
    {256, 1, 4, true, true, 16, false, false},  // dense
    {257, 1, 4, true, false, 16, false, false},  // dense
    {512, 1, 4, true, false, 16, false, true},  // dense
    {4096, 1, 4, true, false, 16, true, true},  // dense
    {256, 4, 16, false, false, 16, false, false},  // edge
    {1024, 8, 0, false, false, 64, false, true},  // edge
    {512, 1, 0, false, false, 64, false, true},  // edge
    {72, 8, 0, false, true, 64, false, false},  // edge
    {100, 0, 0, false, true, 64, false, false},  // edge
    {600, 0, 3, false, false, 64, false, true},  // edge
};

TEST_CASE("plan_lora: form, block size, align kernel and family per step shape") {
  for (const StepRow& r : kSteps) {
    LoraStep step;
    step.num_pairs = r.num_pairs;
    step.num_experts = r.num_experts;
    step.num_adapters = r.num_adapters;
    step.dense = r.dense;
    step.dtype = DType::kBFloat16;
    const LoraPlan p = plan_lora(step, h200());
    const std::string row = " pairs=" + std::to_string(r.num_pairs) +
                            " experts=" + std::to_string(r.num_experts) +
                            " adapters=" + std::to_string(r.num_adapters);
    CHECK_EQ(std::string(to_string(p.form)) + row,
             std::string(r.unsorted ? "unsorted" : "grouped") + row);
    CHECK_EQ(std::to_string(p.block_m) + row, std::to_string(r.block_m) + row);
    CHECK_EQ(p.align == AlignKernel::kMultiCta, r.multi_cta);
    CHECK_EQ(p.kernel == LoraKernel::kMma, r.mma);
    CHECK(p.unaligned_kernel == LoraKernel::kCluster);
    CHECK(p.pdl);
    step.dtype = DType::kFloat32;  // no tensor cores for float32
    CHECK(plan_lora(step, h200()).kernel == LoraKernel::kCluster);
  }
}

TEST_CASE("plan_lora: PDL only on sm_90 and later, never on the CPU") {
  LoraStep step;
  step.num_pairs = 4;
  DeviceProps ampere = h200();
  ampere.cc_major = 8;
  CHECK(!plan_lora(step, ampere).pdl);
  CHECK(!plan_lora(step, DeviceProps{}).pdl);
  PlanOverrides off;
  off.pdl = false;
  CHECK(!plan_lora(step, h200(), off).pdl);
}

TEST_CASE("plan_lora: typed overrides win over the rules") {
  LoraStep step;
  step.num_pairs = 8192;
  step.num_experts = 128;
  step.num_adapters = 4;
  const PlanOverrides o = PlanOverrides::parse(
      "form=unsorted,lora_kernel=splitk,block_m=32,cluster_max=16,mma_split=3,align_kernel=single,"
      "pdl=0");
  const LoraPlan p = plan_lora(step, h200(), o);
  CHECK(p.form == LoraForm::kUnsorted);
  CHECK(p.kernel == LoraKernel::kSplitK);
  CHECK(p.unaligned_kernel == LoraKernel::kSplitK);
  CHECK_EQ(p.block_m, 32);
  CHECK_EQ(p.cluster_max, 16);
  CHECK_EQ(p.mma_split, 3);
  CHECK(p.align == AlignKernel::kSingleCta);
  CHECK(!p.pdl);
  CHECK_EQ(PlanOverrides::parse(o.describe()).describe(), o.describe());
}

TEST_CASE("PlanOverrides: bad keys and values are InvalidArgument") {
  CHECK_THROWS_AS(PlanOverrides::parse("lora_kernel=tiles"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("cluster_max=17"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("mma_split=0"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("attention_splits=9"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("pdl=yes"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("splits=2"), InvalidArgument);
  CHECK_THROWS_AS(PlanOverrides::parse("form"), InvalidArgument);
  PlanOverrides o;
  o.cluster_max = 17;
  CHECK_THROWS_AS(plan_lora(LoraStep{}, h200(), o), InvalidArgument);
  CHECK(!PlanOverrides::parse("form=auto,pdl=auto").form);
}

struct MmaRow {
  int64_t num_pairs;
  int32_t num_experts, view_slots, active_slots, block_m;
  int64_t in_dim, widest_out;
  int32_t split;
};

const MmaRow kMmaSplits[] = {
    {512, 32, 16, 4, 16, 2880, 2880, 8},  // gpt-oss-20b 128/4 w13
    {512, 32, 16, 4, 16, 2880, 2880, 8},  // gpt-oss-20b 128/4 w2
    {512, 32, 16, 0, 16, 2880, 2880, 3},  // gpt-oss-20b 128/4 w13
    {512, 32, 16, 0, 16, 2880, 2880, 3},  // gpt-oss-20b 128/4 w2
    {512, 32, 16, 16, 16, 2880, 2880, 3},  // gpt-oss-20b 128/16 w13
    {512, 32, 16, 16, 16, 2880, 2880, 3},  // gpt-oss-20b 128/16 w2
    {512, 32, 16, 0, 16, 2880, 2880, 3},  // gpt-oss-20b 128/16 w13
    {512, 32, 16, 0, 16, 2880, 2880, 3},  // gpt-oss-20b 128/16 w2
    {2048, 32, 16, 4, 64, 2880, 2880, 3},  // gpt-oss-20b 512/4 w13
    {2048, 32, 16, 4, 64, 2880, 2880, 3},  // gpt-oss-20b 512/4 w2
    {2048, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 512/4 w13
    {2048, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 512/4 w2
    {2048, 32, 16, 16, 16, 2880, 2880, 2},  // gpt-oss-20b 512/16 w13
    {2048, 32, 16, 16, 16, 2880, 2880, 2},  // gpt-oss-20b 512/16 w2
    {2048, 32, 16, 0, 16, 2880, 2880, 2},  // gpt-oss-20b 512/16 w13
    {2048, 32, 16, 0, 16, 2880, 2880, 2},  // gpt-oss-20b 512/16 w2
    {8192, 32, 16, 4, 64, 2880, 2880, 2},  // gpt-oss-20b 2048/4 w13
    {8192, 32, 16, 4, 64, 2880, 2880, 2},  // gpt-oss-20b 2048/4 w2
    {8192, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/4 w13
    {8192, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/4 w2
    {8192, 32, 16, 16, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/16 w13
    {8192, 32, 16, 16, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/16 w2
    {8192, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/16 w13
    {8192, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 2048/16 w2
    {32768, 32, 16, 4, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/4 w13
    {32768, 32, 16, 4, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/4 w2
    {32768, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/4 w13
    {32768, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/4 w2
    {32768, 32, 16, 16, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/16 w13
    {32768, 32, 16, 16, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/16 w2
    {32768, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/16 w13
    {32768, 32, 16, 0, 64, 2880, 2880, 1},  // gpt-oss-20b 8192/16 w2
    {1024, 128, 16, 4, 16, 2048, 768, 2},  // qwen3-30b-a3b 128/4 w13
    {1024, 128, 16, 4, 16, 768, 2048, 2},  // qwen3-30b-a3b 128/4 w2
    {1024, 128, 16, 0, 16, 2048, 768, 1},  // qwen3-30b-a3b 128/4 w13
    {1024, 128, 16, 0, 16, 768, 2048, 1},  // qwen3-30b-a3b 128/4 w2
    {1024, 128, 16, 16, 16, 2048, 768, 1},  // qwen3-30b-a3b 128/16 w13
    {1024, 128, 16, 16, 16, 768, 2048, 1},  // qwen3-30b-a3b 128/16 w2
    {1024, 128, 16, 0, 16, 2048, 768, 1},  // qwen3-30b-a3b 128/16 w13
    {1024, 128, 16, 0, 16, 768, 2048, 1},  // qwen3-30b-a3b 128/16 w2
    {4096, 128, 16, 4, 16, 2048, 768, 2},  // qwen3-30b-a3b 512/4 w13
    {4096, 128, 16, 4, 16, 768, 2048, 2},  // qwen3-30b-a3b 512/4 w2
    {4096, 128, 16, 0, 16, 2048, 768, 1},  // qwen3-30b-a3b 512/4 w13
    {4096, 128, 16, 0, 16, 768, 2048, 1},  // qwen3-30b-a3b 512/4 w2
    {4096, 128, 16, 16, 16, 2048, 768, 1},  // qwen3-30b-a3b 512/16 w13
    {4096, 128, 16, 16, 16, 768, 2048, 1},  // qwen3-30b-a3b 512/16 w2
    {4096, 128, 16, 0, 16, 2048, 768, 1},  // qwen3-30b-a3b 512/16 w13
    {4096, 128, 16, 0, 16, 768, 2048, 1},  // qwen3-30b-a3b 512/16 w2
    {16384, 128, 16, 4, 64, 2048, 768, 1},  // qwen3-30b-a3b 2048/4 w13
    {16384, 128, 16, 4, 64, 768, 2048, 1},  // qwen3-30b-a3b 2048/4 w2
    {16384, 128, 16, 0, 64, 2048, 768, 1},  // qwen3-30b-a3b 2048/4 w13
    {16384, 128, 16, 0, 64, 768, 2048, 1},  // qwen3-30b-a3b 2048/4 w2
    {16384, 128, 16, 16, 16, 2048, 768, 1},  // qwen3-30b-a3b 2048/16 w13
    {16384, 128, 16, 16, 16, 768, 2048, 1},  // qwen3-30b-a3b 2048/16 w2
    {16384, 128, 16, 0, 16, 2048, 768, 1},  // qwen3-30b-a3b 2048/16 w13
    {16384, 128, 16, 0, 16, 768, 2048, 1},  // qwen3-30b-a3b 2048/16 w2
    {65536, 128, 16, 4, 64, 2048, 768, 1},  // qwen3-30b-a3b 8192/4 w13
    {65536, 128, 16, 4, 64, 768, 2048, 1},  // qwen3-30b-a3b 8192/4 w2
    {65536, 128, 16, 0, 64, 2048, 768, 1},  // qwen3-30b-a3b 8192/4 w13
    {65536, 128, 16, 0, 64, 768, 2048, 1},  // qwen3-30b-a3b 8192/4 w2
    {65536, 128, 16, 16, 64, 2048, 768, 1},  // qwen3-30b-a3b 8192/16 w13
    {65536, 128, 16, 16, 64, 768, 2048, 1},  // qwen3-30b-a3b 8192/16 w2
    {65536, 128, 16, 0, 64, 2048, 768, 1},  // qwen3-30b-a3b 8192/16 w13
    {65536, 128, 16, 0, 64, 768, 2048, 1},  // qwen3-30b-a3b 8192/16 w2
    {256, 8, 16, 4, 16, 4096, 14336, 8},  // mixtral-8x7b 128/4 w13
    {256, 8, 16, 4, 16, 14336, 4096, 8},  // mixtral-8x7b 128/4 w2
    {256, 8, 16, 0, 16, 4096, 14336, 8},  // mixtral-8x7b 128/4 w13
    {256, 8, 16, 0, 16, 14336, 4096, 8},  // mixtral-8x7b 128/4 w2
    {256, 8, 16, 16, 16, 4096, 14336, 8},  // mixtral-8x7b 128/16 w13
    {256, 8, 16, 16, 16, 14336, 4096, 8},  // mixtral-8x7b 128/16 w2
    {256, 8, 16, 0, 16, 4096, 14336, 8},  // mixtral-8x7b 128/16 w13
    {256, 8, 16, 0, 16, 14336, 4096, 8},  // mixtral-8x7b 128/16 w2
    {1024, 8, 16, 4, 64, 4096, 14336, 8},  // mixtral-8x7b 512/4 w13
    {1024, 8, 16, 4, 64, 14336, 4096, 8},  // mixtral-8x7b 512/4 w2
    {1024, 8, 16, 0, 64, 4096, 14336, 3},  // mixtral-8x7b 512/4 w13
    {1024, 8, 16, 0, 64, 14336, 4096, 3},  // mixtral-8x7b 512/4 w2
    {1024, 8, 16, 16, 16, 4096, 14336, 6},  // mixtral-8x7b 512/16 w13
    {1024, 8, 16, 16, 16, 14336, 4096, 6},  // mixtral-8x7b 512/16 w2
    {1024, 8, 16, 0, 16, 4096, 14336, 6},  // mixtral-8x7b 512/16 w13
    {1024, 8, 16, 0, 16, 14336, 4096, 6},  // mixtral-8x7b 512/16 w2
    {4096, 8, 16, 4, 64, 4096, 14336, 6},  // mixtral-8x7b 2048/4 w13
    {4096, 8, 16, 4, 64, 14336, 4096, 6},  // mixtral-8x7b 2048/4 w2
    {4096, 8, 16, 0, 64, 4096, 14336, 3},  // mixtral-8x7b 2048/4 w13
    {4096, 8, 16, 0, 64, 14336, 4096, 3},  // mixtral-8x7b 2048/4 w2
    {4096, 8, 16, 16, 64, 4096, 14336, 3},  // mixtral-8x7b 2048/16 w13
    {4096, 8, 16, 16, 64, 14336, 4096, 3},  // mixtral-8x7b 2048/16 w2
    {4096, 8, 16, 0, 64, 4096, 14336, 3},  // mixtral-8x7b 2048/16 w13
    {4096, 8, 16, 0, 64, 14336, 4096, 3},  // mixtral-8x7b 2048/16 w2
    {16384, 8, 16, 4, 64, 4096, 14336, 2},  // mixtral-8x7b 8192/4 w13
    {16384, 8, 16, 4, 64, 14336, 4096, 2},  // mixtral-8x7b 8192/4 w2
    {16384, 8, 16, 0, 64, 4096, 14336, 1},  // mixtral-8x7b 8192/4 w13
    {16384, 8, 16, 0, 64, 14336, 4096, 1},  // mixtral-8x7b 8192/4 w2
    {16384, 8, 16, 16, 64, 4096, 14336, 1},  // mixtral-8x7b 8192/16 w13
    {16384, 8, 16, 16, 64, 14336, 4096, 1},  // mixtral-8x7b 8192/16 w2
    {16384, 8, 16, 0, 64, 4096, 14336, 1},  // mixtral-8x7b 8192/16 w13
    {16384, 8, 16, 0, 64, 14336, 4096, 1},  // mixtral-8x7b 8192/16 w2
    {1024, 64, 16, 4, 16, 2048, 1024, 3},  // olmoe-1b-7b 128/4 w13
    {1024, 64, 16, 4, 16, 1024, 2048, 3},  // olmoe-1b-7b 128/4 w2
    {1024, 64, 16, 0, 16, 2048, 1024, 2},  // olmoe-1b-7b 128/4 w13
    {1024, 64, 16, 0, 16, 1024, 2048, 2},  // olmoe-1b-7b 128/4 w2
    {1024, 64, 16, 16, 16, 2048, 1024, 2},  // olmoe-1b-7b 128/16 w13
    {1024, 64, 16, 16, 16, 1024, 2048, 2},  // olmoe-1b-7b 128/16 w2
    {1024, 64, 16, 0, 16, 2048, 1024, 2},  // olmoe-1b-7b 128/16 w13
    {1024, 64, 16, 0, 16, 1024, 2048, 2},  // olmoe-1b-7b 128/16 w2
    {4096, 64, 16, 4, 64, 2048, 1024, 2},  // olmoe-1b-7b 512/4 w13
    {4096, 64, 16, 4, 64, 1024, 2048, 2},  // olmoe-1b-7b 512/4 w2
    {4096, 64, 16, 0, 64, 2048, 1024, 1},  // olmoe-1b-7b 512/4 w13
    {4096, 64, 16, 0, 64, 1024, 2048, 1},  // olmoe-1b-7b 512/4 w2
    {4096, 64, 16, 16, 16, 2048, 1024, 1},  // olmoe-1b-7b 512/16 w13
    {4096, 64, 16, 16, 16, 1024, 2048, 1},  // olmoe-1b-7b 512/16 w2
    {4096, 64, 16, 0, 16, 2048, 1024, 1},  // olmoe-1b-7b 512/16 w13
    {4096, 64, 16, 0, 16, 1024, 2048, 1},  // olmoe-1b-7b 512/16 w2
    {16384, 64, 16, 4, 64, 2048, 1024, 1},  // olmoe-1b-7b 2048/4 w13
    {16384, 64, 16, 4, 64, 1024, 2048, 1},  // olmoe-1b-7b 2048/4 w2
    {16384, 64, 16, 0, 64, 2048, 1024, 1},  // olmoe-1b-7b 2048/4 w13
    {16384, 64, 16, 0, 64, 1024, 2048, 1},  // olmoe-1b-7b 2048/4 w2
    {16384, 64, 16, 16, 64, 2048, 1024, 1},  // olmoe-1b-7b 2048/16 w13
    {16384, 64, 16, 16, 64, 1024, 2048, 1},  // olmoe-1b-7b 2048/16 w2
    {16384, 64, 16, 0, 64, 2048, 1024, 1},  // olmoe-1b-7b 2048/16 w13
    {16384, 64, 16, 0, 64, 1024, 2048, 1},  // olmoe-1b-7b 2048/16 w2
    {65536, 64, 16, 4, 64, 2048, 1024, 1},  // olmoe-1b-7b 8192/4 w13
    {65536, 64, 16, 4, 64, 1024, 2048, 1},  // olmoe-1b-7b 8192/4 w2
    {65536, 64, 16, 0, 64, 2048, 1024, 1},  // olmoe-1b-7b 8192/4 w13
    {65536, 64, 16, 0, 64, 1024, 2048, 1},  // olmoe-1b-7b 8192/4 w2
    {65536, 64, 16, 16, 64, 2048, 1024, 1},  // olmoe-1b-7b 8192/16 w13
    {65536, 64, 16, 16, 64, 1024, 2048, 1},  // olmoe-1b-7b 8192/16 w2
    {65536, 64, 16, 0, 64, 2048, 1024, 1},  // olmoe-1b-7b 8192/16 w13
    {65536, 64, 16, 0, 64, 1024, 2048, 1},  // olmoe-1b-7b 8192/16 w2
};

// The tensor-core kernel's cluster split as the launchers compose it: the grid bound over the
// step's adapters, the blocks expected to fill, the CTA width from block_m, the widest slice's
// column tiles and the K chunks (lora/dispatch.cu, lora/prefill.cu).
int32_t mma_split(const MmaRow& r, const LoraPlan& plan, const DeviceProps& device) {
  const int64_t max_blocks =
      moe_lora_align_max_blocks(r.num_pairs, r.num_experts, r.view_slots, r.block_m);
  const int64_t bound =
      plan_rules::launch_blocks(max_blocks, r.num_pairs, r.num_experts, r.active_slots, r.block_m);
  const int64_t slots = r.active_slots > 0 ? r.active_slots : r.view_slots;
  int64_t expected =
      plan_rules::expected_blocks(r.num_pairs, slots, r.num_experts, r.block_m, bound);
  const int64_t launch = std::clamp<int64_t>(bound, 1, max_blocks);
  expected = std::clamp<int64_t>(expected, 1, launch);
  const int warps = std::clamp((r.block_m + 15) / 16, 1, 4);
  const int64_t mtiles = (r.block_m + 16 * warps - 1) / (16 * warps);
  plan_rules::MmaSplitShape shape{};
  shape.widest_tiles = (r.widest_out + 63) / 64;
  shape.k_chunks = (r.in_dim + 63) / 64;
  shape.expected_items = expected * mtiles;
  shape.warps = warps;
  return plan_rules::mma_cluster_split(shape, plan, device);
}

TEST_CASE("mma_cluster_split: the tensor-core cluster split per prefill shape") {
  const LoraPlan plan;
  for (const MmaRow& r : kMmaSplits) {
    const std::string row = " pairs=" + std::to_string(r.num_pairs) + " in=" +
                            std::to_string(r.in_dim) + " active=" + std::to_string(r.active_slots);
    CHECK_EQ(std::to_string(mma_split(r, plan, h200())) + row, std::to_string(r.split) + row);
  }
  DeviceProps ampere = h200();
  ampere.cc_major = 8;
  CHECK_EQ(mma_split(kMmaSplits[0], plan, ampere), 1);  // no clusters before sm_90
  LoraPlan forced;
  forced.mma_split = 6;
  CHECK_EQ(mma_split(kMmaSplits[0], forced, h200()), 6);
}

struct DecodeRow {
  int64_t in_dim, out_width;
  int vec_bytes;
  int64_t items;
  int32_t cluster_max;
  int cluster_size, column_groups;
  int64_t piece;
};

const DecodeRow kDecodeShapes[] = {
    {2880, 5760, 16, 4, 0, 8, 2, 360},  // gpt-oss-20b 1 w13
    {2880, 2880, 16, 4, 0, 8, 1, 360},  // gpt-oss-20b 1 w2
    {2880, 5760, 16, 32, 0, 8, 1, 360},  // gpt-oss-20b 8 w13
    {2880, 2880, 16, 32, 0, 8, 1, 360},  // gpt-oss-20b 8 w2
    {2880, 5760, 16, 128, 0, 1, 2, 2048},  // gpt-oss-20b 32 w13
    {2880, 2880, 16, 128, 0, 1, 2, 2048},  // gpt-oss-20b 32 w2
    {2880, 5760, 16, 512, 0, 1, 1, 2048},  // gpt-oss-20b 128 w13
    {2880, 2880, 16, 512, 0, 1, 1, 2048},  // gpt-oss-20b 128 w2
    {2048, 1536, 16, 8, 0, 8, 1, 256},  // qwen3-30b-a3b 1 w13
    {768, 2048, 16, 8, 0, 3, 2, 256},  // qwen3-30b-a3b 1 w2
    {2048, 1536, 16, 64, 0, 4, 1, 512},  // qwen3-30b-a3b 8 w13
    {768, 2048, 16, 64, 0, 3, 1, 256},  // qwen3-30b-a3b 8 w2
    {2048, 1536, 16, 256, 0, 1, 1, 2048},  // qwen3-30b-a3b 32 w13
    {768, 2048, 16, 256, 0, 1, 1, 768},  // qwen3-30b-a3b 32 w2
    {2048, 1536, 16, 1024, 0, 1, 1, 2048},  // qwen3-30b-a3b 128 w13
    {768, 2048, 16, 1024, 0, 1, 1, 768},  // qwen3-30b-a3b 128 w2
    {4096, 28672, 16, 2, 0, 16, 7, 256},  // mixtral-8x7b 1 w13
    {14336, 4096, 16, 2, 0, 16, 1, 896},  // mixtral-8x7b 1 w2
    {4096, 28672, 16, 16, 0, 16, 1, 256},  // mixtral-8x7b 8 w13
    {14336, 4096, 16, 16, 0, 16, 1, 896},  // mixtral-8x7b 8 w2
    {4096, 28672, 16, 64, 0, 4, 1, 1024},  // mixtral-8x7b 32 w13
    {14336, 4096, 16, 64, 0, 3, 1, 2048},  // mixtral-8x7b 32 w2
    {4096, 28672, 16, 256, 0, 1, 1, 2048},  // mixtral-8x7b 128 w13
    {14336, 4096, 16, 256, 0, 1, 1, 2048},  // mixtral-8x7b 128 w2
    {2048, 2048, 16, 8, 0, 8, 1, 256},  // olmoe-1b-7b 1 w13
    {1024, 2048, 16, 8, 0, 4, 2, 256},  // olmoe-1b-7b 1 w2
    {2048, 2048, 16, 64, 0, 4, 1, 512},  // olmoe-1b-7b 8 w13
    {1024, 2048, 16, 64, 0, 4, 1, 256},  // olmoe-1b-7b 8 w2
    {2048, 2048, 16, 256, 0, 1, 1, 2048},  // olmoe-1b-7b 32 w13
    {1024, 2048, 16, 256, 0, 1, 1, 1024},  // olmoe-1b-7b 32 w2
    {2048, 2048, 16, 1024, 0, 1, 1, 2048},  // olmoe-1b-7b 128 w13
    {1024, 2048, 16, 1024, 0, 1, 1, 1024},  // olmoe-1b-7b 128 w2
    {2880, 2880, 16, 4, 16, 11, 1, 264},  // cluster_max 16
    {2880, 2880, 16, 4, 3, 3, 3, 960},  // cluster_max 3
    {111, 74, 2, 7, 0, 1, 2, 112},  // scalars
    {4104, 888, 16, 2, 0, 16, 1, 264},  // in_dim 4104
};

// A stand-in for the occupancy API: 3 CTAs per SM (2 with pieces over 1024 inputs), and 7/8 of
// resident CTAs / C clusters (a cluster's CTAs share a GPC).
int64_t fake_resident(int cluster_size, int64_t piece) {
  const int64_t total = (piece <= 1024 ? 3 : 2) * 132;
  return cluster_size == 1 ? total : total / cluster_size * 7 / 8;
}

TEST_CASE("decode_shape: cluster size, column groups and piece per decode launch") {
  for (const DecodeRow& r : kDecodeShapes) {
    LoraPlan plan;
    plan.cluster_max = r.cluster_max;
    const int32_t limit = plan_rules::decode_cluster_limit(r.in_dim, plan, h200());
    const plan_rules::DecodeShape s = plan_rules::decode_shape(
        r.in_dim, r.out_width, 2, r.vec_bytes, r.items, limit, fake_resident);
    const std::string at = " in=" + std::to_string(r.in_dim) + " items=" + std::to_string(r.items);
    CHECK_EQ(std::to_string(s.cluster_size) + at, std::to_string(r.cluster_size) + at);
    CHECK_EQ(std::to_string(s.column_groups) + at, std::to_string(r.column_groups) + at);
    CHECK_EQ(s.piece, r.piece);
  }
  DeviceProps ampere = h200();
  ampere.cc_major = 8;
  CHECK_EQ(plan_rules::decode_cluster_limit(4096, LoraPlan{}, ampere), 1);
  CHECK_EQ(plan_rules::decode_cluster_limit(4096, LoraPlan{}, h200()), 16);
  CHECK_EQ(plan_rules::decode_cluster_limit(4095, LoraPlan{}, h200()), 8);
}

struct AttentionRow {
  bool half;
  int32_t cc_major, head_dim, num_heads, num_kv_heads;
  int64_t page_bytes, max_context;
  AttentionKernel start, kernel;
};

const AttentionRow kAttention[] = {
    {true, 9, 128, 32, 8, 65536, 8192, AttentionKernel::kMma, AttentionKernel::kMma},
    {true, 9, 64, 64, 8, 16384, 1048576, AttentionKernel::kMma, AttentionKernel::kMma},
    {true, 9, 128, 128, 8, 65536, 8192, AttentionKernel::kMma, AttentionKernel::kMma},
    {true, 9, 256, 16, 2, 16384, 4096, AttentionKernel::kMma, AttentionKernel::kGqa},
    {true, 9, 36, 8, 8, 9216, 1024, AttentionKernel::kMma, AttentionKernel::kPerHead},
    {false, 9, 128, 32, 8, 131072, 8192, AttentionKernel::kMma, AttentionKernel::kPerHead},
    {true, 7, 128, 32, 8, 65536, 8192, AttentionKernel::kMma, AttentionKernel::kGqa},
    {true, 9, 128, 40, 8, 65536, 8192, AttentionKernel::kMma, AttentionKernel::kMma},
    {true, 9, 128, 32, 8, 65544, 8192, AttentionKernel::kMma, AttentionKernel::kPerHead},
    {true, 9, 128, 32, 8, 65536, 1073741840, AttentionKernel::kMma, AttentionKernel::kGqa},
    {true, 9, 128, 32, 8, 65536, 8192, AttentionKernel::kGqa, AttentionKernel::kGqa},
    {true, 9, 128, 32, 8, 65536, 8192, AttentionKernel::kPerHead, AttentionKernel::kPerHead},
    {true, 9, 64, 80, 5, 65536, 8192, AttentionKernel::kMma, AttentionKernel::kMma},
    {true, 9, 64, 5, 1, 16384, 512, AttentionKernel::kGqa, AttentionKernel::kGqa},
};

TEST_CASE("plan_attention: the first kernel of the chain the shape fits") {
  for (const AttentionRow& r : kAttention) {
    AttentionStep step;
    step.num_heads = r.num_heads;
    step.num_kv_heads = r.num_kv_heads;
    step.head_dim = r.head_dim;
    step.page_bytes = r.page_bytes;
    step.max_context = r.max_context;
    step.dtype = r.half ? DType::kBFloat16 : DType::kFloat32;
    DeviceProps device = h200();
    device.cc_major = r.cc_major;
    PlanOverrides o;
    o.attention_kernel = r.start;
    const AttentionPlan p = plan_attention(step, device, o);
    CHECK_EQ(std::string(to_string(p.kernel)) + " head_dim=" + std::to_string(r.head_dim),
             std::string(to_string(r.kernel)) + " head_dim=" + std::to_string(r.head_dim));
    CHECK(p.prefill == PrefillAttention::kPaged);
    CHECK(plan_attention(step, DeviceProps{}).prefill == PrefillAttention::kSdpa);
  }
  PlanOverrides sdpa;
  sdpa.prefill_attention = PrefillAttention::kSdpa;
  CHECK(plan_attention(AttentionStep{}, h200(), sdpa).prefill == PrefillAttention::kSdpa);
}

struct SplitRow {
  int64_t ctas, max_context, resident_ctas;
  int32_t splits;
};

const SplitRow kSplits[] = {
    {8, 1024, 0, 4},
    {8, 8192, 0, 8},
    {256, 8192, 0, 2},
    {2048, 32768, 0, 1},
    {32, 32768, 0, 8},
    {8, 1024, 132, 4},
    {64, 8192, 132, 2},
    {8, 32768, 264, 8},
    {500, 32768, 264, 1},
    {1, 100, 0, 1},
    {3, 300, 0, 1},
};

TEST_CASE("attention_splits: split-KV per launch size") {
  const AttentionPlan plan;
  for (const SplitRow& r : kSplits) {
    CHECK_EQ(plan_rules::attention_splits(r.ctas, r.max_context, r.resident_ctas, plan, h200()),
             r.splits);
  }
  AttentionPlan forced;
  forced.splits = 3;
  CHECK_EQ(plan_rules::attention_splits(2048, 32768, 0, forced, h200()), 3);
  DeviceProps ampere = h200();
  ampere.cc_major = 8;
  CHECK_EQ(plan_rules::attention_splits(8, 8192, 0, plan, ampere), 1);
}

}  // namespace

MOELORA_TEST_MAIN()
