"""Programmatic dependent launch between the LoRA kernels (cuda/common/launch.cuh; marked gpu).

A LoRA kernel may start before the kernel ahead of it in the stream has finished; it must then
wait (griddepcontrol.wait) before it touches memory. One that read or wrote too early would race
with its predecessor, so every link of the chain below depends on the link before it through
memory both ways: link k reads the buffer link k - 1 wrote (read after write) and read-modify-
writes the buffer link k - 1 read (write after read); in the grouped form link k also re-runs
the alignment into fresh tensors, which the caching allocator hands out from memory the previous
link's kernels were still reading in stream order. The chain runs with the plan's PDL on,
eagerly and replayed from a CUDA graph, and must match bit for bit the same chain run with PDL off
(PlanOverrides(pdl=False)) and a device synchronize after every link.
"""

from __future__ import annotations

import moelora
import pytest
import torch
from lora_fixtures import assign_slots, route_experts
from moelora import ops
from test_gpu_ops import CUDA, SLOT_RANKS, gpu_view, make_site, plan_for

pytestmark = pytest.mark.gpu

LINKS = 6


def make_chain(tokens, dim, top_k, experts, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = tokens * top_k
    sites = [make_site(SLOT_RANKS, experts, dim, dim, dtype, seed + i) for i in (1, 2)]
    return {
        "token_slot": assign_slots(tokens, SLOT_RANKS, "zipf", seed).to(CUDA),
        "topk_ids": route_experts(tokens, top_k, experts, seed + 3).to(CUDA),
        "views": [gpu_view(s) for s in sites],
        "experts": experts,
        "start": [torch.randn(pairs, dim, generator=gen).to(dtype).to(CUDA) for _ in range(2)],
    }


def run_links(chain, form, block_m, buffers, sync_each, plan):
    for k in range(LINKS):
        src, dst = buffers[k % 2], buffers[(k + 1) % 2]
        view = [chain["views"][k % 2]]
        if form == "unsorted":
            ops.fused_moe_lora_unsorted(src, dst, chain["topk_ids"], chain["token_slot"], view,
                                        [0], input_pairs_per_row=1, plan=plan)
        else:
            meta = ops.moe_lora_align(chain["topk_ids"], chain["token_slot"], chain["experts"],
                                      len(SLOT_RANKS), block_m, plan=plan)
            ops.fused_moe_lora(src, dst, *meta, block_m, view, [0], input_pairs_per_row=1,
                               plan=plan)
        if sync_each:
            torch.cuda.synchronize()


def fresh(chain):
    return [t.clone() for t in chain["start"]]


@pytest.mark.parametrize(
    "form,family,tokens,dim,block_m",
    [
        ("unsorted", "auto", 1, 888, 0),
        ("unsorted", "auto", 7, 888, 0),
        ("unsorted", "auto", 7, 111, 0),
        ("grouped", "splitk", 7, 888, 16),
        ("grouped", "cluster", 7, 111, 16),
        ("grouped", "cluster", 133, 888, 64),
        ("grouped", "mma", 133, 888, 16),
        ("grouped", "mma", 133, 888, 64),
        ("grouped", "auto", 257, 2880, 64),
    ],
)
def test_gpu_chained_lora_kernels_match_serialized_run(form, family, tokens, dim, block_m):
    chain = make_chain(tokens, dim, 4, 32, torch.bfloat16, seed=tokens * 7 + dim + block_m)
    pairs = tokens * 4
    serial = plan_for(pairs, num_experts=32, lora_kernel=family, pdl=False)
    plan = plan_for(pairs, num_experts=32, lora_kernel=family)
    assert plan.pdl and not serial.pdl

    expected = fresh(chain)
    run_links(chain, form, block_m, expected, sync_each=True, plan=serial)
    assert not torch.equal(expected[0], chain["start"][0])  # the chain did change the buffers

    for _ in range(3):  # eager: the kernels of all links queued back to back
        got = fresh(chain)
        run_links(chain, form, block_m, got, sync_each=False, plan=plan)
        torch.cuda.synchronize()
        for g, e in zip(got, expected):
            assert torch.equal(g, e)

    buffers = fresh(chain)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        run_links(chain, form, block_m, fresh(chain), sync_each=False, plan=plan)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_links(chain, form, block_m, buffers, sync_each=False, plan=plan)
    for _ in range(3):
        for b, s in zip(buffers, chain["start"]):
            b.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        for b, e in zip(buffers, expected):
            assert torch.equal(b, e)


def test_pdl_override_rejects_other_values():
    with pytest.raises(moelora.InvalidArgument, match="pdl must be 0, 1 or auto"):
        ops.PlanOverrides(pdl="yes")
