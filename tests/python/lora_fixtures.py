"""Random multi-slot LoRA weights packed into a torch-owned arena, for the kernel tests.

The packing is deliberately unlike the C++ row layout: every row (A rows [in_dim], B^T rows
[out_dim]) of every (slot, expert) lands at a shuffled, 16-byte aligned offset with random gaps,
so a kernel that assumes contiguous or ordered rows fails. Row-table entries past a slot's rank
point at a NaN-filled row, so a kernel that reads beyond the rank poisons its output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from moelora.ops import LoraSiteView, make_site_view

ALIGN = 16


@dataclass
class LoraSite:
    view: LoraSiteView
    ranks: list[int]  # per slot; 0 = slot does not target this site
    a: list[list[torch.Tensor | None]]  # [slot][expert] float64 [rank, in_dim]
    b: list[list[torch.Tensor | None]]  # [slot][expert] float64 [out_dim, rank]
    in_dim: int
    out_dim: int

    def delta(self, x64: torch.Tensor, slot: int, expert: int) -> torch.Tensor | None:
        """(x @ A^T) @ B^T in float64, or None when the slot has rank 0 here."""
        if self.ranks[slot] == 0:
            return None
        return (x64 @ self.a[slot][expert].T) @ self.b[slot][expert].T


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def make_lora_site(
    ranks: list[int],
    num_experts: int,
    in_dim: int,
    out_dim: int,
    dtype: torch.dtype,
    seed: int,
    max_rank: int | None = None,
) -> LoraSite:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_slots = len(ranks)
    max_rank = max_rank if max_rank is not None else max(max(ranks), 1)
    elem = torch.empty((), dtype=dtype).element_size()

    a: list[list[torch.Tensor | None]] = []
    b: list[list[torch.Tensor | None]] = []
    rows = []  # (slot, expert, is_b, r, values in dtype)
    for slot, rank in enumerate(ranks):
        a.append([])
        b.append([])
        for expert in range(num_experts):
            if rank == 0:
                a[-1].append(None)
                b[-1].append(None)
                continue
            # Scaled so the delta is O(1) whatever the dims, keeping tolerances meaningful.
            a_w = (torch.randn(rank, in_dim, generator=gen) / in_dim**0.5).to(dtype)
            bt_w = (torch.randn(rank, out_dim, generator=gen) / rank**0.5).to(dtype)
            a[-1].append(a_w.double())
            b[-1].append(bt_w.double().T.contiguous())
            rows += [(slot, expert, False, r, a_w[r]) for r in range(rank)]
            rows += [(slot, expert, True, r, bt_w[r]) for r in range(rank)]
    rng.shuffle(rows)

    # Offsets: shuffled order, random 16-byte-multiple gaps, one NaN row for unused entries.
    poison_bytes = _align(max(in_dim, out_dim) * elem)
    offset = rng.randrange(0, 4) * ALIGN + poison_bytes
    placed = []
    for row in rows:
        offset += rng.randrange(0, 3) * ALIGN
        placed.append((offset, row))
        offset += _align(row[4].numel() * elem)
    arena = torch.full((offset + ALIGN,), 0xFF, dtype=torch.uint8)  # 0xFF.. is NaN in fp formats
    arena[:poison_bytes] = 0xFF
    for off, (_, _, _, _, values) in placed:
        raw = values.contiguous().view(torch.uint8)
        arena[off : off + raw.numel()] = raw

    # Row table with a slot stride wider than one slot's entries (extra columns are garbage).
    per_slot = num_experts * 2 * max_rank
    table = torch.zeros(num_slots, per_slot + 3, dtype=torch.int64)  # offset 0 = the NaN row
    for off, (slot, expert, is_b, r, _) in placed:
        table[slot, (expert * 2 + int(is_b)) * max_rank + r] = off
    table[:, per_slot:] = -(1 << 40)
    rank_table = torch.full((num_slots, 3), -7, dtype=torch.int32)
    rank_table[:, 0] = torch.tensor(ranks, dtype=torch.int32)

    view = make_site_view(
        arena,
        table,
        rank_table,
        num_experts=num_experts,
        max_rank=max_rank,
        in_dim=in_dim,
        out_dim=out_dim,
        dtype=dtype,
    )
    return LoraSite(view, list(ranks), a, b, in_dim, out_dim)


POPULARITIES = ["distinct", "uniform", "zipf", "identical", "skewed"]


def assign_slots(
    num_tokens: int, ranks: list[int], popularity: str, seed: int, base_fraction: float = 0.2
) -> torch.Tensor:
    """int32 [num_tokens] adapter slot per token under a popularity pattern, with -1 (base) mixed in."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = len(ranks)
    if popularity == "distinct":
        slots = torch.arange(num_tokens) % num_slots
    elif popularity == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        weights = torch.tensor([1.0 / (i + 1) ** 1.2 for i in range(num_slots)])
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    elif popularity == "identical":
        busiest = max(range(num_slots), key=lambda s: ranks[s])
        slots = torch.full((num_tokens,), busiest)
    elif popularity == "skewed":
        slots = torch.where(
            torch.rand(num_tokens, generator=gen) < 0.9,
            torch.zeros(num_tokens, dtype=torch.int64),
            torch.randint(0, num_slots, (num_tokens,), generator=gen),
        )
    else:
        raise ValueError(popularity)
    base = torch.rand(num_tokens, generator=gen) < base_fraction
    if num_tokens > 1:
        base[0] = False  # keep at least one adapter token
    return torch.where(base, torch.full_like(slots, -1), slots).to(torch.int32)


def route_experts(num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """int32 [num_tokens, top_k] distinct experts per token, skewed so some experts get no token."""
    gen = torch.Generator().manual_seed(seed)
    # Experts in the upper third are never chosen when there are enough others.
    usable = max(top_k, num_experts - num_experts // 3)
    weights = torch.tensor([1.0 / (e + 1) for e in range(usable)])
    ids = torch.stack(
        [torch.multinomial(weights, top_k, replacement=False, generator=gen) for _ in range(num_tokens)]
    )
    return ids.to(torch.int32)
