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
    # decode: the persistent stream kernel, 8-row blocks while experts hold a row or two
    (GPT_OSS, 1, "mxfp4", "stream", 8),
    (GPT_OSS, 16, "mxfp4", "stream", 8),
    (GPT_OSS, 64, "mxfp4", "stream", 16),
    (QWEN3, 16, "dense", "stream", 8),
    (QWEN3, 64, "fp8", "stream", 16),
    (QWEN3, 64, "dense", "stream", 16),
    # prefill: dense to torch's grouped GEMM, quantized to the tiled kernel, then dequantized
    (GPT_OSS, 512, "dense", "grouped_mm", 64),
    (QWEN3, 512, "dense", "grouped_mm", 64),
    (GPT_OSS, 512, "mxfp4", "tensor_core", 64),
    (QWEN3, 512, "fp8", "tensor_core", 32),
    (GPT_OSS, 2048, "mxfp4", "grouped_mm", 64),
    (QWEN3, 2048, "fp8", "grouped_mm", 64),
])
def test_plan_by_step_shape(shape, tokens, fmt, kernel, block_m):
    experts, top_k = shape
    assert moe_ops.plan_expert_gemm(tokens * top_k, experts, fmt) == \
        moe_ops.GemmPlan(kernel, block_m)


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
    assert moe_ops.plan_expert_gemm(0, 32, "mxfp4").kernel == "stream"
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
