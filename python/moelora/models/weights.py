"""Checkpoint tensor -> model parameter mapping, with coverage tracking.

A checkpoint tensor whose name equals a parameter name loads as is. Others match a WeightRule:
a checkpoint-name template with {layer} and optionally {expert}, the target parameter, which
part of it (an expert's gate rows, up rows, a fixed row range of a fused parameter such as q_proj
inside qkv_proj, or everything), and a layout transform. A fused parameter is filled in place,
one checkpoint tensor at a time, so loading never holds two copies. Every parameter is split
into units ((expert, part) for expert stacks, one per row range for fused parameters, one unit
otherwise); a load fails naming the tensor when a unit is filled twice, a shape differs, a name
is unknown, or (at the end) a unit was never filled.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


@dataclass(frozen=True)
class WeightRule:
    checkpoint: str  # e.g. "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight"
    param: str  # e.g. "model.layers.{layer}.mlp.experts.w13"
    part: str = "all"  # "gate" / "up": rows [0, I) / [I, 2I) of the expert's w13 (or b13)
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: tuple[int, int] | None = None  # fills rows [lo, hi) of a fused parameter

    def __post_init__(self) -> None:
        if self.part not in ("all", "gate", "up"):
            raise ValueError(f"WeightRule part must be all/gate/up, got {self.part!r}")
        if self.rows is not None and (self.part != "all" or "{expert}" in self.checkpoint
                                      or not 0 <= self.rows[0] < self.rows[1]):
            raise ValueError(f"WeightRule {self.checkpoint!r}: rows {self.rows} must be a "
                             f"non-empty [lo, hi) range of a non-expert parameter")
        if self.part != "all" and "{expert}" not in self.checkpoint:
            raise ValueError(f"WeightRule {self.checkpoint!r}: a gate/up part needs a per-expert "
                             f"checkpoint name (fused tensors fill the whole parameter)")

    def pattern(self) -> re.Pattern:
        text = re.escape(self.checkpoint)
        text = text.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}",
                                                                      r"(?P<expert>\d+)")
        return re.compile(text + "$")

    def param_pattern(self) -> re.Pattern:
        text = re.escape(self.param).replace(r"\{layer\}", r"\d+")
        return re.compile(text + "$")


# ---- layout transforms --------------------------------------------------------------------


def transpose_experts(t: torch.Tensor) -> torch.Tensor:
    """[E, in, out] (GPT-OSS orientation) -> [E, out, in]."""
    return t.transpose(1, 2)


def gpt_oss_gate_up(t: torch.Tensor) -> torch.Tensor:
    """GPT-OSS gate_up_proj [E, H, 2I] with gate/up interleaved by column -> [E, 2I, H] as
    [gate | up], the layout the MoE block and LoRA kernels use."""
    t = t.transpose(1, 2)
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def gpt_oss_gate_up_bias(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I] interleaved -> [E, 2I] as [gate | up]."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def gpt_oss_gate_up_rows(t: torch.Tensor) -> torch.Tensor:
    """Quantized GPT-OSS gate_up rows [E, 2I, ...] (MXFP4 blocks or scales: rows are the output
    dimension, gate/up interleaved) -> [E, 2I, ...] as [gate | up]: a row permutation only."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def fp8_scale_rules(rules: list[WeightRule]) -> list[WeightRule]:
    """For experts kept in block FP8: each per-expert `<...>.weight` rule of w13 / w2 gets a twin
    for its `<...>.weight_scale_inv`, filling the same part of w13_scale_inv / w2_scale_inv."""
    return [WeightRule(r.checkpoint + "_scale_inv", r.param + "_scale_inv", r.part)
            for r in rules
            if r.checkpoint.endswith(".weight") and r.param.endswith((".w13", ".w2"))
            and r.transform is None]


# ---- the mapper ---------------------------------------------------------------------------

_EXPERT_PARTS = {"w13": ("gate", "up"), "b13": ("gate", "up"), "w2": ("all",), "b2": ("all",)}
# Expert stacks kept quantized (models/moe.py): their row ranges split like w13's and w2's.
_EXPERT_PARTS.update({f"w13_{kind}": ("gate", "up") for kind in ("blocks", "scales", "scale_inv")})
_EXPERT_PARTS.update({f"w2_{kind}": ("all",) for kind in ("blocks", "scales", "scale_inv")})


def _expert_stack(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    return leaf if ".experts." in name and leaf in _EXPERT_PARTS else None


class WeightMapper:
    """Copies checkpoint tensors into `model`'s parameters according to `rules`."""

    def __init__(self, model: nn.Module, rules: list[WeightRule]):
        self.params = dict(model.named_parameters())
        self.rules = [(rule, rule.pattern()) for rule in rules]
        self.filled: dict[str, set] = {name: set() for name in self.params}
        # fused parameters: the row ranges their rules fill, each one unit
        self.row_units: dict[str, set] = {}
        for rule in rules:
            if rule.rows is None:
                continue
            target = rule.param_pattern()
            for name in self.params:
                if target.match(name):
                    self.row_units.setdefault(name, set()).add(rule.rows)

    def units(self, name: str) -> set:
        if name in self.row_units:
            return set(self.row_units[name])
        stack = _expert_stack(name)
        if stack is None:
            return {None}
        num_experts = self.params[name].shape[0]
        return {(e, part) for e in range(num_experts) for part in _EXPERT_PARTS[stack]}

    def load(self, ckpt_name: str, tensor: torch.Tensor) -> None:
        if ckpt_name in self.params and _expert_stack(ckpt_name) is None:
            self._copy(ckpt_name, ckpt_name, tensor, None, "all")
            return
        for rule, pattern in self.rules:
            match = pattern.match(ckpt_name)
            if match is None:
                continue
            fields = match.groupdict()
            param = rule.param.format(layer=fields.get("layer", ""))
            if param not in self.params:
                raise KeyError(f"checkpoint tensor {ckpt_name!r} maps to {param!r}, which this "
                               f"model does not have (more layers in the checkpoint than in "
                               f"the config, or a dense/MoE layer mismatch?)")
            expert = int(fields["expert"]) if "expert" in fields else None
            if rule.transform is not None:
                tensor = rule.transform(tensor)
            self._copy(ckpt_name, param, tensor, expert, rule.part, rule.rows)
            return
        if ckpt_name.endswith(IGNORED_SUFFIXES):
            return
        raise KeyError(f"checkpoint tensor {ckpt_name!r} does not belong to any parameter of "
                       f"this model (unsupported layout or quantisation?)")

    def _copy(self, ckpt_name, param_name, tensor, expert, part, rows=None):
        param = self.params[param_name]
        dest = param.data
        if rows is not None:
            if rows[1] > dest.shape[0]:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} fills rows {rows} of "
                                 f"{param_name}, which has {dest.shape[0]}")
            dest = dest[rows[0]:rows[1]]
        if expert is not None:
            if not 0 <= expert < dest.shape[0]:
                raise KeyError(f"checkpoint tensor {ckpt_name!r}: expert {expert} is out of "
                               f"range for {dest.shape[0]} experts")
            dest = dest[expert]
        if part != "all":
            half = dest.shape[0] // 2
            dest = dest[:half] if part == "gate" else dest[half:]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)} for {param_name}")
        if rows is not None:
            units = {rows}
        elif expert is None:  # WeightRule guarantees part == "all" here: the whole parameter
            units = self.units(param_name)
        else:
            parts = _EXPERT_PARTS[_expert_stack(param_name)] if part == "all" else (part,)
            units = {(expert, p) for p in parts}
        if self.filled[param_name] & units:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} fills {param_name}, which an "
                             f"earlier tensor already filled")
        self.filled[param_name] |= units
        dest.copy_(tensor.to(dtype=dest.dtype))

    def missing(self, names=None) -> list[str]:
        """Human-readable descriptions of every parameter (part) never loaded, among `names`
        (default: all of the model's)."""
        out = []
        for name in self.params if names is None else names:
            lacking = self.units(name) - self.filled[name]
            if not lacking:
                continue
            if lacking == {None}:
                out.append(self._expected_name(name, None, "all"))
                continue
            if name in self.row_units:
                out.extend(self._expected_name(name, None, "all", rows)
                           for rows in sorted(lacking))
                continue
            for expert, part in sorted(lacking)[:4]:
                out.append(self._expected_name(name, expert, part))
            if len(lacking) > 4:
                out.append(f"... and {len(lacking) - 4} more expert slices of {name}")
        return out

    def _expected_name(self, param: str, expert: int | None, part: str,
                       rows: tuple[int, int] | None = None) -> str:
        layer = re.search(r"layers\.(\d+)\.", param)
        for rule, _ in self.rules:
            if layer is None or rule.param.format(layer=layer.group(1)) != param:
                continue
            if rule.rows != rows:
                continue
            if expert is not None and "{expert}" in rule.checkpoint and rule.part in (part,
                                                                                       "all"):
                return rule.checkpoint.format(layer=layer.group(1), expert=expert)
            if expert is None:
                return rule.checkpoint.format(layer=layer.group(1))
        if param == "lm_head_weight":
            return "lm_head.weight"
        suffix = "" if expert is None else f" (expert {expert}, {part})"
        return param + suffix
