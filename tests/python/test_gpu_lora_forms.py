"""The LoRA kernel families and the unsorted (no alignment) form on the GPU (marked gpu).

test_gpu_ops.py checks fused_moe_lora with whatever kernel the plan picks; here every family
is forced in turn (PlanOverrides(lora_kernel=...)), and fused_moe_lora_unsorted (the decode path:
one cluster per pair, no moe_lora_align) is checked on the same problems against the float64
reference and the CPU op, with poisoned outputs, bit-identical repeats and graph capture.
"""

from __future__ import annotations

import pytest
import torch
from moelora import InvalidArgument, ops
from test_gpu_ops import (
    CUDA,
    _fused_cases,
    check_fused_result,
    copy_strided,
    gpu_view,
    make_problem,
    plan_for,
    run_fused,
)

pytestmark = pytest.mark.gpu


def run_unsorted(prob, device, views=None, plan=None):
    dev = torch.device(device)
    x = copy_strided(prob["x"], dev)
    out = copy_strided(prob["output"], dev)
    weights = None if prob["weights"] is None else prob["weights"].to(dev)
    if views is None:
        views = [gpu_view(s) if dev.type == "cuda" else s.view for s in prob["sites"]]
    ops.fused_moe_lora_unsorted(
        x, out, prob["topk_ids"].to(dev), prob["token_slot"].to(dev), views,
        prob["col_offsets"], input_pairs_per_row=prob["pairs_per_row"], topk_weights=weights,
        plan=plan)
    return out


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize("tokens,hidden,popularity,dtype,top_k,experts,block_m,aligned",
                         _fused_cases())
def test_gpu_unsorted_matches_cpu_and_float64(tokens, hidden, popularity, dtype, top_k, experts,
                                              block_m, aligned, stage):
    seed = tokens * 1000 + hidden + top_k * 7 + experts + block_m + (stage == "w2")
    prob = make_problem(tokens, hidden, top_k, experts, popularity, dtype, stage, aligned, seed)
    check_fused_result(run_unsorted(prob, "cuda"), run_unsorted(prob, "cpu"), prob, dtype)


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("hidden,cluster_max", [(4104, None), (2880, 16)])
def test_gpu_unsorted_wide_clusters_match_float64(hidden, cluster_max, tokens, stage):
    """Clusters wider than the portable 8 (non-portable opt-in): the default from in_dim 4096
    (16 CTAs), or forced by the plan's cluster_max (in_dim 2880: 11 CTAs, an odd split of K)."""
    seed = 90 + tokens + (stage == "w2")
    prob = make_problem(tokens, hidden, 2, 8, "uniform", torch.bfloat16, stage, True, seed)
    plan = plan_for(tokens * 2, num_experts=8, cluster_max=cluster_max)
    check_fused_result(run_unsorted(prob, "cuda", plan=plan), None, prob, torch.bfloat16)


def test_gpu_cluster_max_must_be_an_integer_in_range():
    with pytest.raises(InvalidArgument, match=r"cluster_max must be an integer in \[1, 16\]"):
        plan_for(2, cluster_max=17)


# Each family forced; mma with a cluster of 3 CTAs per block (K and columns split). The mma kernel
# declines float32 and unaligned rows, which then take split-K.
FAMILIES = {"splitk": {"lora_kernel": "splitk"}, "cluster": {"lora_kernel": "cluster"},
            "mma-split3": {"lora_kernel": "mma", "mma_split": 3}}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize("tokens,hidden,popularity,dtype,top_k,experts,block_m,aligned",
                         _fused_cases()[::3])
def test_gpu_each_family_matches_cpu_and_float64(family, tokens, hidden, popularity, dtype, top_k,
                                                 experts, block_m, aligned, stage):
    seed = tokens * 1000 + hidden + top_k * 7 + experts + block_m + (stage == "w2")
    prob = make_problem(tokens, hidden, top_k, experts, popularity, dtype, stage, aligned, seed)
    out, _ = run_fused(prob, "cuda", block_m, overrides=FAMILIES[family])
    # test_gpu_ops.py compares the default family with the CPU op; here float64 is enough
    # (and halves this file's CPU time on the device machine).
    check_fused_result(out, None, prob, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 133])
def test_gpu_unsorted_repeats_are_identical_and_capture_in_a_graph(dtype, tokens):
    prob = make_problem(tokens, 2880, 4, 32, "zipf", dtype, "w13", True, seed=11)
    views = [gpu_view(s) for s in prob["sites"]]
    first = run_unsorted(prob, "cuda", views)
    for _ in range(3):
        assert torch.equal(first.nan_to_num(7.0), run_unsorted(prob, "cuda", views).nan_to_num(7.0))
    x = copy_strided(prob["x"], CUDA)
    out = copy_strided(prob["output"], CUDA)
    start = out.clone()
    ids, slots = prob["topk_ids"].to(CUDA), prob["token_slot"].to(CUDA)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up outside the capture
        ops.fused_moe_lora_unsorted(x, out, ids, slots, views, prob["col_offsets"],
                                    input_pairs_per_row=4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.fused_moe_lora_unsorted(x, out, ids, slots, views, prob["col_offsets"],
                                    input_pairs_per_row=4)
    out.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.nan_to_num(7.0), first.nan_to_num(7.0))
