"""The plan through the binding (moelora.ops.plan_lora / plan_attention, include/moelora/plan.h).

tests/cpp/test_plan.cpp pins every rule over a table of shapes; here: the fields Python reads,
the choices the engine relies on (form and block size of the benchmarked shapes), typed
overrides and their errors, and that an op given a plan runs it (on the CPU the plan changes
nothing: one semantics).
"""

from __future__ import annotations

import moelora
import pytest
import torch
from lora_fixtures import assign_slots, make_lora_site, route_experts
from moelora import ops

H200 = ops.DeviceProps(cuda=True, sm_count=132, cc_major=9, cooperative_launch=True)


def moe(pairs, experts, adapters=None, **kw):
    return ops.plan_lora(pairs, num_experts=experts, num_adapters=adapters, device=H200, **kw)


def test_block_m_follows_the_pairs_per_group():
    # (pairs, experts, adapters) -> block_m: 64-row blocks above 8 pairs a group, else 16
    assert moe(512, 32, 4).block_m == 16  # gpt-oss 128 tokens: 4 pairs a group
    assert moe(2048, 32, 4).block_m == 64  # gpt-oss 512 tokens
    assert moe(2048, 32, 16).block_m == 16  # gpt-oss 512 tokens, 16 adapters
    assert moe(256, 8, 4).block_m == 16  # mixtral 128 tokens: 8 pairs a group
    assert moe(1024, 128, 4).block_m == 16  # qwen3 128 tokens
    assert moe(16384, 128, 16).block_m == 16  # qwen3 2048 tokens, 16 adapters: 8 a group
    assert moe(16384, 128, 4).block_m == 64  # qwen3 2048 tokens, 4 adapters: 32 a group
    assert moe(72, 8).block_m == 64  # unknown adapters: taken as one (9 a group)
    assert ops.plan_lora(4096, dense=True, device=H200).block_m == 16


def test_form_follows_the_measured_crossovers():
    def unsorted(pairs, experts, adapters=None):
        return moe(pairs, experts, adapters).form == "unsorted"

    # below 512 pairs unsorted, whatever the pairs per group...
    assert unsorted(4, 32, 4)  # gpt-oss, 1 token
    assert unsorted(256, 32, 4)  # gpt-oss 64 tokens, 2 a group
    assert unsorted(256, 8, 16)  # mixtral 128 tokens, 2
    assert unsorted(256, 8, 4)  # mixtral 128 tokens, 8
    # ...from 512, grouped from 2 pairs a group...
    assert not unsorted(1024, 128, 4)  # qwen3 128 tokens
    assert not unsorted(512, 8, 16)  # mixtral 256 tokens
    assert not unsorted(1024, 32, 16)  # gpt-oss 256 tokens
    # ...and unsorted under it (the engine's 64-sequence qwen3 step: 0.5 a group)
    assert unsorted(512, 128, 8)
    assert unsorted(1024, 64, 16)  # olmoe 128 tokens, 1
    assert unsorted(512, 32, 16)  # gpt-oss 128 tokens, 1
    # unknown adapters: grouped from 512 pairs; few experts: from 64 pairs an expert
    assert not unsorted(1024, 8)
    assert not unsorted(512, 1)
    assert not unsorted(256, 4, 16)
    # dense sites: unsorted up to 256 rows
    dense = [ops.plan_lora(rows, dense=True, device=H200).form for rows in (256, 257)]
    assert dense == ["unsorted", "grouped"]


def test_kernel_family_align_and_pdl():
    plan = moe(8192, 128, 4)
    assert (plan.lora_kernel, plan.unaligned_kernel, plan.align_kernel) == ("mma", "cluster",
                                                                            "multi")
    assert plan.pdl and plan.cluster_max == 0 and plan.mma_split == 0
    small = moe(256, 128, 4)
    assert (small.lora_kernel, small.align_kernel) == ("cluster", "single")
    assert moe(8192, 128, 4, dtype=torch.float32).lora_kernel == "cluster"
    cpu = ops.plan_lora(8192, num_experts=128, device="cpu")
    assert not cpu.pdl
    assert "LoraPlan(form=grouped, block_m=64" in repr(plan)


def test_typed_overrides_force_each_choice():
    forced = ops.PlanOverrides(form="grouped", lora_kernel="splitk", block_m=32, cluster_max=16,
                               mma_split=3, align_kernel="multi", pdl=False)
    plan = moe(4, 32, 4, overrides=forced)
    assert (plan.form, plan.lora_kernel, plan.unaligned_kernel) == ("grouped", "splitk", "splitk")
    assert (plan.block_m, plan.cluster_max, plan.mma_split) == (32, 16, 3)
    assert (plan.align_kernel, plan.pdl) == ("multi", False)
    assert forced.lora_kernel == "splitk" and forced.pdl is False and forced.form == "grouped"
    assert ops.PlanOverrides().lora_kernel is None
    assert ops.PlanOverrides.parse("lora_kernel=mma,pdl=0").lora_kernel == "mma"


@pytest.mark.parametrize("kwargs,message", [
    ({"lora_kernel": "tiles"}, "lora_kernel must be cluster, mma, splitk or auto"),
    ({"cluster_max": 17}, r"cluster_max must be an integer in \[1, 16\]"),
    ({"mma_split": 9}, "mma_split"),
    ({"attention_splits": 0}, "attention_splits"),
    ({"form": "sorted"}, "form must be unsorted, grouped or auto"),
    ({"align_kernel": "several"}, "align_kernel must be single, multi or auto"),
    ({"attention_kernel": "flash"}, "attention_kernel"),
    ({"prefill_attention": "flash"}, "prefill_attention must be sdpa, paged or auto"),
    ({"block_m": [16]}, "block_m must be a str, int or bool"),
])
def test_bad_overrides_are_named(kwargs, message):
    with pytest.raises(moelora.InvalidArgument, match=message):
        ops.PlanOverrides(**kwargs)


def test_attention_plan():
    def plan(head_dim, heads, kv_heads, dtype=torch.bfloat16, device=H200, **kw):
        page_bytes = ops.kv_page_bytes_needed(16, kv_heads, head_dim, dtype)
        return ops.plan_attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                  page_bytes=page_bytes, max_context=8192, dtype=dtype,
                                  device=device, **kw)

    assert plan(128, 32, 8).kernel == "mma"
    assert plan(256, 16, 2).kernel == "gqa"
    assert plan(36, 8, 8).kernel == "per_head"
    assert plan(128, 32, 8, dtype=torch.float32).kernel == "per_head"
    assert plan(128, 32, 8).prefill_attention == "paged"
    assert plan(128, 32, 8, device="cpu").prefill_attention == "sdpa"
    forced = ops.PlanOverrides(attention_kernel="gqa", attention_splits=3,
                               prefill_attention="sdpa")
    p = plan(128, 32, 8, overrides=forced)
    assert (p.kernel, p.splits, p.prefill_attention) == ("gqa", 3, "sdpa")


def test_ops_run_with_a_given_plan():
    # The CPU reference has one semantics: any plan gives the same result as none.
    tokens, top_k, experts, ranks = 7, 2, 4, [3, 0, 5]
    gen = torch.Generator().manual_seed(3)
    site = make_lora_site(ranks, experts, 16, 12, torch.float32, 3)
    token_slot = assign_slots(tokens, ranks, "uniform", 4)
    topk_ids = route_experts(tokens, top_k, experts, 5)
    x = torch.randn(tokens, 16, generator=gen)
    results = []
    for plan in (None, moe(tokens * top_k, experts, 2,
                           overrides=ops.PlanOverrides(lora_kernel="splitk", block_m=2))):
        out = torch.zeros(tokens * top_k, 12)
        block_m = 4 if plan is None else plan.block_m
        meta = ops.moe_lora_align(topk_ids, token_slot, experts, len(ranks), block_m, plan=plan)
        ops.fused_moe_lora(x, out, *meta, block_m, [site.view], [0], input_pairs_per_row=top_k,
                           plan=plan)
        again = torch.zeros_like(out)
        ops.fused_moe_lora_unsorted(x, again, topk_ids, token_slot, [site.view], [0],
                                    input_pairs_per_row=top_k, plan=plan)
        torch.testing.assert_close(out, again)
        results.append(out)
    torch.testing.assert_close(results[0], results[1])


_PRINT_PLAN = """
from moelora import ops
base = ops.plan_lora(8192, num_experts=128, num_adapters=4)
forced = ops.plan_lora(8192, num_experts=128, num_adapters=4,
                       overrides=ops.PlanOverrides(lora_kernel="mma"))
print(base.lora_kernel, base.block_m, forced.lora_kernel, forced.block_m)
"""


def test_the_debugging_variable_applies_under_typed_overrides():
    import os
    import subprocess
    import sys

    def run(value):
        env = dict(os.environ, MOELORA_PLAN=value)
        return subprocess.run([sys.executable, "-c", _PRINT_PLAN], env=env, capture_output=True,
                              text=True, check=False, timeout=60)

    done = run("lora_kernel=splitk,block_m=32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["splitk", "32", "mma", "32"]
    bad = run("lora_kernel=tiles")
    assert bad.returncode != 0 and "lora_kernel must be cluster, mma, splitk or auto" in bad.stderr
