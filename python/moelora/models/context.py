"""ForwardContext: what a model needs from its runner; ReferenceContext: the torch semantics.

Model code never sees pages, adapters or sequences: it hands attention and LoRA to the context.
The engine implements this protocol over the unified page pool with native kernels;
ReferenceContext implements it in plain torch (contiguous KV per sequence, per-slot LoRA loops)
and is the definition the engine's contexts are tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from moelora.models.rope import RopeInputs

EXPERT_SITES = ("experts.gate", "experts.up", "experts.down")


class ForwardContext(Protocol):
    token_slot: torch.Tensor | None  # int32 [T] adapter slot per token, -1 = base model

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float, sliding_window: int | None, sinks: torch.Tensor | None,
                  rope: RopeInputs | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> causal attention [T, Hq, D]. With `rope`, q and k
        are first normed (if it says so) and rotated in place (a paged context fuses that with
        its KV-cache write); without, they come rotated. Rows may be strided views."""

    def lora_delta(self, sites: list[tuple[str, int, int]], layer: int,
                   x: torch.Tensor) -> LoraDelta | None:
        """The per-token LoRA delta of dense sites sharing the input x, each (site, first
        column, site width) in its columns of a [T, delta_width(sites)] tensor (q, k and v of
        one QKV output); None when there is nothing to add. Asked for before the base
        projection runs, added to its output (bias included, PEFT semantics) with
        LoraDelta.add_to."""

    def moe_lora_w13_delta(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                           inter: int) -> LoraDelta | None:
        """x [T, H], topk_ids [T, K] -> the expert LoRA delta [T*K, 2I] ([gate | up]) of h13,
        or None."""

    def moe_lora_w2_delta(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor,
                          topk_weights: torch.Tensor, hidden: int) -> LoraDelta | None:
        """h [T*K, I] -> w * down LoRA delta [T*K, H] of y (already weighted), or None."""


def delta_width(sites: list[tuple[str, int, int]]) -> int:
    """Columns of the output that (site, first column, site width) entries cover."""
    return max(first + size for _, first, size in sites)


class LoraDelta:
    """A LoRA delta computed apart from the base output it belongs to. A context may compute it
    on a stream of its own (the engine does while it captures a decode graph, so that the LoRA
    kernels run beside the base GEMM instead of after it); `ready` is then the event that
    add_to makes the consumer's stream wait for."""

    __slots__ = ("delta", "ready")

    def __init__(self, delta: torch.Tensor, ready: torch.cuda.Event | None = None):
        self.delta, self.ready = delta, ready

    def joined(self) -> torch.Tensor:
        """The delta, for an op on the current stream that takes it as an addend."""
        if self.ready is not None:
            torch.cuda.current_stream(self.delta.device).wait_event(self.ready)
            self.ready = None
        return self.delta

    def add_to(self, out: torch.Tensor) -> torch.Tensor:
        """out += delta, in place, on the current stream."""
        return out.add_(self.joined())


# adapters[slot][site][layer] = (A [E, r, in], B [E, out, r]); scaling already folded into B.
AdapterWeights = dict[int, dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]]


def _lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x.float() @ a.float().T) @ b.float().T


class ReferenceContext:
    """Plain-torch context: contiguous KV cache per (sequence, layer), per-slot LoRA loops.

    Per step call `begin_step(seq_ids, positions, token_slot)`; each sequence's tokens must be
    the next positions of that sequence (its cache length), in order. Attention matches HF's
    eager attention: GQA by repeating KV heads, sliding window keeps keys with
    `q_pos - k_pos < window`, sinks are one extra logit per head dropped after the softmax.
    """

    def __init__(self, adapters: AdapterWeights | None = None):
        self.adapters: AdapterWeights = adapters or {}
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.seq_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.token_slot: torch.Tensor | None = None

    def begin_step(self, seq_ids: torch.Tensor, positions: torch.Tensor,
                   token_slot: torch.Tensor | None = None) -> None:
        if seq_ids.shape != positions.shape or seq_ids.dim() != 1:
            raise ValueError(f"seq_ids {tuple(seq_ids.shape)} and positions "
                             f"{tuple(positions.shape)} must both be [T]")
        if token_slot is not None and token_slot.shape != seq_ids.shape:
            raise ValueError(f"token_slot {tuple(token_slot.shape)} must be [T] like seq_ids")
        self.seq_ids, self.positions = seq_ids.cpu(), positions.cpu()
        self.token_slot = token_slot

    def free(self, seq_id: int) -> None:
        """Drop a finished sequence's cache."""
        for key in [k for k in self.kv if k[0] == seq_id]:
            del self.kv[key]

    def seq_len(self, seq_id: int, layer: int = 0) -> int:
        entry = self.kv.get((seq_id, layer))
        return 0 if entry is None else entry[0].shape[0]

    # ---- attention ---------------------------------------------------------------------

    def attention(self, layer, q, k, v, *, scale, sliding_window, sinks, rope=None):
        if self.seq_ids is None or self.seq_ids.numel() != q.shape[0]:
            raise ValueError("begin_step(seq_ids, positions) must describe this step's tokens")
        if rope is not None:
            rope.rotate(q, k)
        out = torch.empty_like(q)
        for seq_id in torch.unique(self.seq_ids).tolist():
            rows = (self.seq_ids == seq_id).nonzero().flatten().to(q.device)
            pos = self.positions[rows.cpu()]
            cached = self.seq_len(seq_id, layer)
            expected = torch.arange(cached, cached + rows.numel())
            if not torch.equal(pos, expected):
                raise ValueError(f"sequence {seq_id} layer {layer}: positions {pos.tolist()} do "
                                 f"not continue its cache of {cached} tokens")
            keys, values = k[rows], v[rows]
            if cached:
                old_k, old_v = self.kv[(seq_id, layer)]
                keys, values = torch.cat([old_k, keys]), torch.cat([old_v, values])
            self.kv[(seq_id, layer)] = (keys, values)
            out[rows] = self._attend(q[rows], keys, values, pos.to(q.device), scale,
                                     sliding_window, sinks)
        return out

    @staticmethod
    def _attend(q, keys, values, q_pos, scale, sliding_window, sinks):
        n_rep = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(n_rep, dim=1)  # kv head h // n_rep serves query head h
        values = values.repeat_interleave(n_rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        k_pos = torch.arange(keys.shape[0], device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        if sinks is not None:
            sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores.float(), dim=-1)
        return torch.einsum("hqk,khd->qhd", probs.to(values.dtype), values)

    # ---- LoRA --------------------------------------------------------------------------

    def _slots(self):
        if self.token_slot is None:
            return []
        return [s for s in torch.unique(self.token_slot).tolist() if s >= 0]

    def _weights(self, slot: int, site: str, layer: int):
        if slot not in self.adapters:
            raise KeyError(f"token_slot names adapter slot {slot}, which is not loaded")
        return self.adapters[slot].get(site, {}).get(layer)

    def lora_delta(self, sites, layer, x):
        if not self._slots():
            return None
        delta = x.new_zeros(x.shape[0], delta_width(sites))
        for site, first, size in sites:
            self._add_dense(site, layer, x, delta[:, first:first + size])
        return LoraDelta(delta)

    def _add_dense(self, site, layer, x, out):
        for slot in self._slots():
            ab = self._weights(slot, site, layer)
            if ab is None:
                continue
            rows = (self.token_slot == slot).nonzero().flatten().to(x.device)
            out[rows] += _lora_delta(x[rows], ab[0][0], ab[1][0]).to(out.dtype)

    def _expert_pairs(self, topk_ids: torch.Tensor):
        """(slot, expert, pair rows [n], token rows [n]) for every adapter-routed group."""
        if self.token_slot is None:
            return
        k = topk_ids.shape[1]
        pair_token = torch.arange(topk_ids.numel(), device=topk_ids.device) // k
        pair_slot = self.token_slot.to(topk_ids.device).long()[pair_token]
        flat_ids = topk_ids.flatten().long()
        for slot in self._slots():
            for expert in torch.unique(flat_ids[pair_slot == slot]).tolist():
                pairs = ((pair_slot == slot) & (flat_ids == expert)).nonzero().flatten()
                yield slot, expert, pairs, pair_token[pairs]

    def moe_lora_w13_delta(self, layer, x, topk_ids, inter):
        if not self._slots():
            return None
        h13 = x.new_zeros(topk_ids.numel(), 2 * inter)
        for slot, expert, pairs, tokens in self._expert_pairs(topk_ids):
            for site, cols in (("experts.gate", slice(0, inter)),
                               ("experts.up", slice(inter, 2 * inter))):
                ab = self._weights(slot, site, layer)
                if ab is not None:
                    delta = _lora_delta(x[tokens], ab[0][expert], ab[1][expert])
                    h13[pairs, cols] += delta.to(h13.dtype)
        return LoraDelta(h13)

    def moe_lora_w2_delta(self, layer, h, topk_ids, topk_weights, hidden):
        if not self._slots():
            return None
        y = h.new_zeros(h.shape[0], hidden)
        flat_w = topk_weights.flatten()
        for slot, expert, pairs, _ in self._expert_pairs(topk_ids):
            ab = self._weights(slot, "experts.down", layer)
            if ab is not None:
                delta = _lora_delta(h[pairs], ab[0][expert], ab[1][expert])
                y[pairs] += (flat_w[pairs, None].float() * delta).to(y.dtype)
        return LoraDelta(y)
