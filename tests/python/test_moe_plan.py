"""The expert GEMM plan (moelora.ops.moe.GEMM_PLAN / plan_expert_gemm): the form each step shape
gets, that every row of the table names a kernel that can run its block size, and that the plan
travels from the router through the routing to the experts. CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch
from moelora.models.config import ModelConfig
from moelora.models.moe import Router
from moelora.ops import moe as moe_ops

# (preset experts, top_k): gpt-oss-20b 32 x 4, qwen3-30b-a3b 128 x 8
GPT_OSS, QWEN3 = (32, 4), (128, 8)


@pytest.mark.parametrize("shape,tokens,fmt,kernel,block_m", [
    # decode: the tiled kernel with 8-row blocks while experts hold a row or two
    (GPT_OSS, 1, "mxfp4", "tensor_core", 8),
    (GPT_OSS, 16, "mxfp4", "tensor_core", 8),
    (QWEN3, 1, "dense", "tensor_core", 8),
    (QWEN3, 16, "dense", "tensor_core", 8),
    (QWEN3, 64, "fp8", "tensor_core", 16),
    # dense bfloat16 to torch's grouped GEMM once experts hold more than a row
    (GPT_OSS, 16, "dense", "grouped_mm", 64),
    (QWEN3, 64, "dense", "grouped_mm", 64),
    (GPT_OSS, 512, "dense", "grouped_mm", 64),
    # quantized stacks stay in the tiled kernel, 32-row blocks from a few rows per expert
    (GPT_OSS, 64, "mxfp4", "tensor_core", 32),
    (GPT_OSS, 512, "mxfp4", "tensor_core", 32),
    (QWEN3, 512, "fp8", "tensor_core", 32),
    (GPT_OSS, 2048, "mxfp4", "tensor_core", 32),
    (QWEN3, 2048, "fp8", "tensor_core", 32),
])
def test_plan_by_step_shape(shape, tokens, fmt, kernel, block_m):
    experts, top_k = shape
    splits = moe_ops.SPLIT_BY_SHAPE if kernel == "tensor_core" else 1
    assert moe_ops.plan_expert_gemm(tokens * top_k, experts, fmt) == \
        moe_ops.GemmPlan(kernel, block_m, splits=splits)


def test_every_table_row_can_run():
    for fmt, rows in moe_ops.GEMM_PLAN.items():
        assert fmt in moe_ops.FORMATS
        assert rows[-1][0] == math.inf, f"{fmt}: the last row must hold every step"
        bounds = [most for most, _, _ in rows]
        assert bounds == sorted(bounds), f"{fmt}: rows in increasing rows per expert"
        for _, kernel, block_m in rows:
            assert kernel in moe_ops.GEMM_KERNELS
            if kernel == "stream":
                assert block_m in moe_ops.STREAM_BLOCK_M
            elif kernel == "tensor_core":
                assert block_m in moe_ops.TENSOR_CORE_BLOCK_M


def test_plan_of_an_empty_step_and_bad_names():
    assert moe_ops.plan_expert_gemm(0, 32, "mxfp4").kernel == "tensor_core"
    with pytest.raises(ValueError, match="weight format must be one of"):
        moe_ops.plan_expert_gemm(4, 32, "int4")
    with pytest.raises(ValueError, match="kernel must be one of"):
        moe_ops.GemmPlan("fastest", 8)
    with pytest.raises(ValueError, match="last row must hold math.inf"):
        moe_ops.plan_expert_gemm(4096, 8, "dense", table={"dense": ((4, "stream", 8),)})


def test_route_takes_the_plans_block_size_and_carries_it():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    plan = moe_ops.GemmPlan("stream", 16)
    r = moe_ops.route(logits, 2, "softmax_topk", True, plan=plan)
    assert r.block_m == 16 and r.plan == plan
    assert r.sorted_pairs.numel() == r.block_expert.numel() * 16
    assert moe_ops.route(logits, 2, "softmax_topk", True, 8, plan).block_m == 8  # explicit wins
    assert moe_ops.route(logits, 2).plan is None


@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_router_plans_for_its_expert_format(fmt):
    config = ModelConfig(architecture="test", family="qwen3_moe", vocab_size=16,
                         hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32,
                         num_experts=32, top_k=4, moe_intermediate_size=64, expert_format=fmt)
    router = Router(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(1))
    for tokens in (1, 16, 512):
        r = router.route(torch.randn(tokens, 64))
        assert r.plan == moe_ops.plan_expert_gemm(tokens * 4, 32, fmt)
        assert r.block_m == r.plan.block_m


def test_a_planned_kernel_runs_on_the_cpu_reference():
    # the CPU ignores the kernel: a planned stream or grouped step computes the reference
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, generator=gen)
    w = moe_ops.ExpertWeights("dense", torch.randn(4, 32, 64, generator=gen) * 0.1)
    logits = torch.randn(3, 4, generator=gen)
    plain = moe_ops.expert_gemm(x, moe_ops.route(logits, 2), w, input_pairs_per_row=2)
    planned = moe_ops.route(logits, 2, plan=moe_ops.GemmPlan("stream", 8))
    assert torch.equal(moe_ops.expert_gemm(x, planned, w, input_pairs_per_row=2), plain)


def test_plans_read_and_print_as_the_benchmark_names_them():
    assert moe_ops.GemmPlan.parse("stream:16:12") == moe_ops.GemmPlan("stream", 16, 12)
    assert moe_ops.GemmPlan.parse("grouped_mm") == moe_ops.GemmPlan("grouped_mm", 64)
    assert str(moe_ops.GemmPlan("tensor_core", 32)) == "tensor_core:32"
    assert str(moe_ops.GemmPlan("stream", 8, 12)) == "stream:8:12"
    with pytest.raises(ValueError, match="stream_consumers must be in"):
        moe_ops.GemmPlan("stream", 8, moe_ops.MAX_STREAM_CONSUMERS + 1)
    with pytest.raises(ValueError, match=r"kernel\[:block_m\[:consumers\]\]"):
        moe_ops.GemmPlan.parse("stream:8:4:2")


def test_stream_consumers_out_of_range_is_named():
    from moelora import InvalidArgument

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, generator=gen)
    w = moe_ops.ExpertWeights("dense", torch.randn(4, 16, 64, generator=gen))
    routing = moe_ops.route(torch.randn(2, 4, generator=gen), 2)
    with pytest.raises(InvalidArgument, match="stream_consumers must be in"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="stream",
                            stream_consumers=13)


def test_benchmark_variants_and_table():
    from moelora.bench import moe as bench_moe

    assert bench_moe.variant_plan("plan", 64, 32, "mxfp4") == \
        (moe_ops.plan_expert_gemm(64, 32, "mxfp4"), False)
    assert bench_moe.variant_plan("tiles", 4, 32, "bf16") == (moe_ops.GemmPlan("tensor_core", 8),
                                                              True)
    assert bench_moe.variant_plan("tiles", 256, 32, "bf16")[0].block_m == 32
    assert bench_moe.variant_plan("stream:16:12", 4, 32, "fp8") == \
        (moe_ops.GemmPlan("stream", 16, 12), True)
    assert bench_moe.variant_plan("tensor_core:8:s4", 4, 32, "mxfp4") == \
        (moe_ops.GemmPlan("tensor_core", 8, splits=4), True)
    records = [
        {"preset": "p", "weights": "mxfp4", "tokens": 1, "variant": "tiles", "layer_us": 80.0,
         "roofline_fraction": 0.2, "gemm_roofline_fraction": 0.25},
        {"preset": "p", "weights": "mxfp4", "tokens": 1, "variant": "stream:8",
         "layer_us": 20.0, "roofline_fraction": 0.8, "gemm_roofline_fraction": 0.85},
        {"preset": "p", "weights": "mxfp4", "tokens": 2048, "variant": "tiles",
         "layer_us": 100.0, "roofline_fraction": 0.1, "gemm_roofline_fraction": 0.1},
        {"preset": "p", "weights": "mxfp4", "tokens": 2048, "variant": "stream:8",
         "error": "refused"},
    ]
    table = bench_moe.format_table(records).splitlines()
    assert "tiles" in table[0] and "stream:8" in table[0]
    assert table[2].split("|")[2].split()[-1] == "4.00"  # 80 us / 20 us
    assert "refused" in table[3]


# ---- split-K of the tiled kernel ---------------------------------------------------------------

H100_SMS = 132


def _mxfp4_stack(experts: int, n: int, k: int) -> moe_ops.ExpertWeights:
    """Shapes only: the rule reads sizes, never values."""
    return moe_ops.ExpertWeights("mxfp4", torch.empty(experts, n, k // 32, 16, dtype=torch.uint8),
                                 torch.empty(experts, n, k // 32, dtype=torch.uint8))


def _gpt_oss_ways(tokens: int, block_m: int = 8) -> tuple[int, int]:
    """(w13, w2) split-K ways of gpt-oss-20b MXFP4 (hidden = expert width = 2880, 32 experts,
    top-4) on an H100's 132 SMs."""
    w13, w2 = _mxfp4_stack(32, 2 * 2880, 2880), _mxfp4_stack(32, 2880, 2880)
    ways = []
    for w, gated in ((w13, True), (w2, False)):
        ctas, k_steps = moe_ops.tiled_grid(w, gated, block_m, tokens * 4, 4)
        ways.append(moe_ops.split_k_ways(ctas, k_steps, H100_SMS))
    return tuple(ways)


def test_tiled_grid_counts_tiles_blocks_and_k_steps():
    w13 = _mxfp4_stack(32, 2 * 2880, 2880)
    ctas, k_steps = moe_ops.tiled_grid(w13, True, 8, 4, 4)  # one token: 4 experts, 1 block each
    assert k_steps == 23  # 1440 bytes a row, 64 a step
    assert ctas == pytest.approx(90 * 4)  # 2880 / 32 gated column tiles
    ctas, _ = moe_ops.tiled_grid(_mxfp4_stack(32, 2880, 2880), False, 8, 4, 4)
    assert ctas == pytest.approx(45 * 4)
    dense = moe_ops.ExpertWeights("dense", torch.empty(8, 100, 888, dtype=torch.bfloat16))
    assert moe_ops.tiled_grid(dense, False, 8, 0, 2) == (0, 28)  # no pairs, no blocks
    ctas, k_steps = moe_ops.tiled_grid(dense, False, 8, 64, 2)  # 32 tokens: ~all 8 experts
    assert k_steps == 28 and ctas == pytest.approx(2 * 8, rel=1e-3)  # 2 tiles x 8 blocks
    ctas, _ = moe_ops.tiled_grid(dense, False, 8, 640, 2)  # full blocks: 80 of them
    assert ctas == pytest.approx(2 * 80)
    fp8 = moe_ops.ExpertWeights("fp8", torch.empty(4, 64, 896, dtype=torch.uint8),
                                torch.empty(4, 4, 28), block_n=16, block_k=32)
    assert moe_ops.tiled_grid(fp8, True, 16, 1, 1)[1] == 14


def test_split_rule_at_gpt_oss_decode_shapes():
    # one token: w13 360 CTAs (0.55 waves of 660) stays whole; w2 180 CTAs (0.27) wants 8
    # ways for two waves, and K's 23 k-steps allow them
    assert _gpt_oss_ways(1) == (1, 8)
    # 16 tokens: ~28 experts, w13 ~2500 CTAs and w2 ~1260, both past one wave: whole
    assert _gpt_oss_ways(16) == (1, 1)
    assert _gpt_oss_ways(64, 32) == (1, 1)


def test_split_rule_at_dense_decode_shapes():
    # bf16 rows are long (gpt-oss-20b: 90 k-steps): eight ways up to 2.5 waves of CTAs
    w13 = moe_ops.ExpertWeights("dense", torch.empty(32, 2 * 2880, 2880, dtype=torch.bfloat16))
    for tokens in (1, 3):
        ctas, k_steps = moe_ops.tiled_grid(w13, True, 8, tokens * 4, 4)
        assert k_steps == 90
        assert moe_ops.split_k_ways(ctas, k_steps, H100_SMS, dense=True) == 8
    wave = H100_SMS * moe_ops.TILED_CTAS_PER_SM
    assert moe_ops.split_k_ways(2 * wave, 90, H100_SMS, dense=True) == 8
    assert moe_ops.split_k_ways(3 * wave, 90, H100_SMS, dense=True) == 1
    # the same grid of quantized rows stays whole past SPLIT_BELOW_WAVES
    assert moe_ops.split_k_ways(wave, 90, H100_SMS) == 1


def test_split_rule_bounds():
    wave = H100_SMS * moe_ops.TILED_CTAS_PER_SM
    for dense in (False, True):
        assert moe_ops.split_k_ways(4 * wave, 100, H100_SMS, dense) == 1  # past the waves
        assert moe_ops.split_k_ways(0, 100, H100_SMS, dense) == 1  # an empty step
        assert moe_ops.split_k_ways(10, 12, H100_SMS, dense) == 1  # rows too short to split
    assert moe_ops.split_k_ways(wave / 4, 100, H100_SMS) == 8  # two waves
    assert moe_ops.split_k_ways(1, 1000, H100_SMS) == moe_ops.MAX_GEMM_SPLITS
    for ctas in (1, 7, 133, 400, wave - 1):
        for k_steps in (1, 4, 9, 16, 23, 90):
            for dense in (False, True):
                ways = moe_ops.split_k_ways(ctas, k_steps, H100_SMS, dense)
                assert 1 <= ways <= moe_ops.MAX_GEMM_SPLITS
                assert ways == 1 or k_steps // ways >= moe_ops.SPLIT_MIN_K_STEPS
    # the SM count is read, not assumed: a smaller GPU needs fewer ways
    assert moe_ops.split_k_ways(180, 23, 66) < moe_ops.split_k_ways(180, 23, H100_SMS)


def test_split_plans_read_print_and_validate():
    assert moe_ops.GemmPlan.parse("tensor_core:8:s3") == moe_ops.GemmPlan("tensor_core", 8,
                                                                          splits=3)
    assert moe_ops.GemmPlan.parse("tensor_core:8:s").splits == moe_ops.SPLIT_BY_SHAPE
    assert moe_ops.GemmPlan.parse("tensor_core:8").splits == 1
    for text in ("tensor_core:8:s3", "tensor_core:32:s", "tensor_core:16", "stream:16:12",
                 "grouped_mm:64"):
        assert str(moe_ops.GemmPlan.parse(text)) == text
    assert str(moe_ops.plan_expert_gemm(4, 32, "mxfp4")) == "tensor_core:8:s"
    with pytest.raises(ValueError, match="split-K is the tensor_core kernel's"):
        moe_ops.GemmPlan.parse("stream:8:4:s2")
    with pytest.raises(ValueError, match="split-K runs with block_m in"):
        moe_ops.GemmPlan("tensor_core", 64, splits=2)
    with pytest.raises(ValueError, match="splits must be in"):
        moe_ops.GemmPlan("tensor_core", 8, splits=moe_ops.MAX_GEMM_SPLITS + 1)


def test_split_k_on_the_cpu_is_the_reference():
    # the CPU ignores the kernel and its splits; the arguments are still checked
    from moelora import InvalidArgument

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen)
    w = moe_ops.ExpertWeights("dense", torch.randn(4, 32, 64, generator=gen) * 0.1)
    routing = moe_ops.route(torch.randn(3, 4, generator=gen), 2, block_m=8)
    plain = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2)
    split = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core",
                                splits=3)
    assert torch.equal(split, plain)
    with pytest.raises(InvalidArgument, match="splits must be in"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core",
                            splits=moe_ops.MAX_GEMM_SPLITS + 1)
    with pytest.raises(InvalidArgument, match="simple kernel takes splits = 1"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="simple", splits=2)
    with pytest.raises(InvalidArgument, match="workspace must hold"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core",
                            splits=2, workspace=torch.empty(10))
    prefill = moe_ops.route(torch.randn(3, 4, generator=gen), 2, block_m=64)
    with pytest.raises(InvalidArgument, match="splits > 1 runs with block_m 8, 16 or 32"):
        moe_ops.expert_gemm(x, prefill, w, input_pairs_per_row=2, kernel="tensor_core",
                            splits=2)
