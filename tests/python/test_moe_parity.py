"""The parity diagnostic (moelora.bench.moe_parity) on the CPU: a bfloat16 model against its
float32 reference, per layer; a routing near-tie that flips one token's expert (what a GPU's
different rounding of the router logits does) is reported as a near-tie and explains the whole
gap, while a real routing difference is not excused.
"""

from __future__ import annotations

import copy

import torch
from moelora.bench import moe_parity
from moelora.models.synthetic import build_synthetic


def _models(expert_weights: str):
    reference = build_synthetic("tiny-moe", dtype=torch.float32, num_layers=2,
                                expert_weights=expert_weights)
    test = copy.deepcopy(reference)
    for name, param in test.named_parameters():
        if param.dtype == torch.float32 and not name.endswith("_scale_inv"):
            param.data = param.data.to(torch.bfloat16)
    return reference, test


def test_bf16_against_float32_layer_by_layer():
    free, forced, ref, test = moe_parity.run("tiny-moe", "mxfp4", 2, 37, "cpu", torch.bfloat16)
    assert [r.site for r in free[:3]] == ["attention", "router logits", "moe"]
    assert free[-1].site == "logits" and free[-1].relative_error < 2e-2
    assert forced[-1].relative_error < 2e-2
    assert not moe_parity.near_ties_only(ref, test)
    assert "logits" in moe_parity.format_rows(free)


def test_a_flipped_near_tie_is_told_apart_from_a_wrong_expert():
    reference, test = _models("mxfp4")
    ids = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(37)
    ref = moe_parity.trace(reference, ids, positions)
    logits = ref.router_logits[1]
    ranked = logits.sort(dim=1, descending=True)
    margin = ranked.values[:, 1] - ranked.values[:, 2]
    token = int(margin.argmin())
    assert margin[token] < 1e-3 * logits.abs().max()  # this prompt has a near-tie at layer 1

    flipped = {layer: ids_.clone() for layer, ids_ in ref.topk_ids.items()}
    flipped[1][token, 1] = ranked.indices[token, 2]  # the runner-up instead of the 2nd choice
    test_trace = moe_parity.trace(test, ids, positions, force=flipped)
    rows = moe_parity.compare(ref, test_trace)
    assert rows[-1].relative_error > 3e-2  # one token's expert: several percent of the logits
    assert f"token {token} margin" in rows[4].note
    assert not moe_parity.near_ties_only(ref, test_trace)
    following = moe_parity.trace(reference, ids, positions, force=test_trace.topk_ids)
    assert moe_parity.compare(following, test_trace)[-1].relative_error < 2e-2

    wrong = {layer: ids_.clone() for layer, ids_ in ref.topk_ids.items()}
    wrong[1][token, 1] = ranked.indices[token, -1]  # the last expert: no tie at all
    bad = moe_parity.near_ties_only(ref, moe_parity.trace(test, ids, positions, force=wrong))
    assert bad == [f"layer 1 token {token}: margin " + bad[0].split("margin ")[1]]
