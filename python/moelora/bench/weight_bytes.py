"""Bytes of a model's weights as stored, and of what one decode step must read: the roofline.

The roofline of a decode step is the fewest bytes it can move over the card's measured copy
rate (shared/BENCHMARKS.md): every weight the step touches, counted as stored, read once, plus
the KV cache it attends over. Per layer that is the input and post-attention norms, the QKV and
o projections (with biases, q/k norms, GPT-OSS sinks), the router, each routed expert that at
least one token of the step selected (matrices and biases), a shared expert or a dense MLP where
the layer has one; once per step the embedding rows of the step's tokens, the final norm and the
LM head; and with adapters in the step, each adapter's attention A/B and the A/B of every
(adapter, expert) pair its tokens were routed to.

Storage formats, in bytes a weight:
  fp32 4, bf16 / fp16 2;
  fp8   1 + one float32 scale per 128 x 128 block (block-scaled FP8 checkpoints);
  mxfp4 17/32 = 4.25 bits: 32 E2M1 codes in 16 bytes plus one E8M0 exponent byte per block.
Norm weights, routers, embeddings, the LM head and biases stay in the model dtype (GPT-OSS keeps
its norm weights and sinks in float32); quantization applies to the matrices of the experts
(mxfp4, GPT-OSS's checkpoints) or of the experts and dense projections (fp8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelora.bench.flags import WEIGHT_CHOICES

FP8_BLOCK = 128
MXFP4_BLOCK = 32
BYTES_PER_WEIGHT = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK),
    "mxfp4": (MXFP4_BLOCK // 2 + 1) / MXFP4_BLOCK,
}
_DTYPE_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Measured device-to-device copy rates (bytes read + written per second; BENCHMARKS.md).
COPY_RATES = (("H200", 4.18e12), ("H100 80GB HBM3", 3.0e12))


def dtype_format(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_FORMATS:
        raise ValueError(f"no weight format for dtype {dtype}; known: {list(_DTYPE_FORMATS)}")
    return _DTYPE_FORMATS[dtype]


def bytes_per_weight(fmt: str) -> float:
    if fmt not in BYTES_PER_WEIGHT:
        raise ValueError(f"unknown weight format {fmt!r}; known: {sorted(BYTES_PER_WEIGHT)}")
    return BYTES_PER_WEIGHT[fmt]


def copy_rate_for(device_name: str) -> float | None:
    """The measured copy rate of a card torch names `device_name` (None when not measured)."""
    for fragment, rate in COPY_RATES:
        if fragment in device_name:
            return rate
    return None


@dataclass(frozen=True)
class WeightLayout:
    """How each kind of weight is stored: `dtype` (the model dtype's format: norms, routers,
    embeddings, LM head, biases), `dense` (attention projections, dense and shared MLPs) and
    `experts` (routed expert matrices)."""

    dtype: str
    dense: str
    experts: str

    def __post_init__(self) -> None:
        for fmt in (self.dtype, self.dense, self.experts):
            bytes_per_weight(fmt)

    @classmethod
    def of(cls, weights: str, dtype: torch.dtype) -> WeightLayout:
        """The layout of a model in `dtype` whose checkpoint kind is `weights` (bf16: every
        matrix in the model dtype; mxfp4: experts in MXFP4; fp8: experts and dense matrices)."""
        base = dtype_format(dtype)
        if weights in ("bf16", "fp16", "fp32") or weights == base:
            return cls(base, base, base)
        if weights == "mxfp4":
            return cls(base, base, "mxfp4")
        if weights == "fp8":
            return cls(base, "fp8", "fp8")
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")

    @property
    def name(self) -> str:
        """The record's `weights` field: the experts' format (the bulk of a MoE model)."""
        return self.experts


def _norm_bytes(config, dim: int, layout: WeightLayout) -> float:
    return dim * (4.0 if config.norm_weight_fp32 else bytes_per_weight(layout.dtype))


def attention_bytes(config, layout: WeightLayout) -> float:
    """One layer's norms and attention: input and post-attention norms, QKV (+ bias), q/k
    norms, sinks, o_proj (+ bias)."""
    c = config
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    elem, dense = bytes_per_weight(layout.dtype), bytes_per_weight(layout.dense)
    total = 2 * _norm_bytes(c, h, layout)
    total += h * (q + 2 * kv) * dense + (q + 2 * kv) * elem * c.qkv_bias
    total += q * h * dense + h * elem * c.o_bias
    if c.qk_norm == "head":
        total += 2 * c.head_dim * elem
    elif c.qk_norm == "full":
        total += (q + kv) * elem
    if c.attention_sinks:
        total += c.num_heads * 4.0
    return total


def router_bytes(config, layout: WeightLayout) -> float:
    elem = bytes_per_weight(layout.dtype)
    return config.num_experts * config.hidden_size * elem + config.num_experts * elem * \
        config.router_bias


def expert_bytes(config, layout: WeightLayout) -> float:
    """One routed expert: w13 [2I, H] and w2 [H, I] as stored, plus its biases."""
    h, i = config.hidden_size, config.moe_intermediate_size
    matrices = 3 * h * i * bytes_per_weight(layout.experts)
    biases = (2 * i + h) * bytes_per_weight(layout.dtype) * config.expert_bias
    return matrices + biases


def mlp_bytes(config, layer: int, layout: WeightLayout) -> float:
    """The layer's MLP weights that every token reads: a dense MLP, or a MoE layer's router and
    shared expert (routed experts are counted by expert_bytes)."""
    c = config
    elem, dense = bytes_per_weight(layout.dtype), bytes_per_weight(layout.dense)
    if not c.moe_layers[layer]:
        inter = c.intermediate_size
        return 3 * c.hidden_size * inter * dense + (2 * inter + c.hidden_size) * elem * c.mlp_bias
    total = router_bytes(c, layout)
    if c.shared_expert_intermediate_size:
        total += 3 * c.hidden_size * c.shared_expert_intermediate_size * dense
        total += c.hidden_size * elem  # the shared expert's sigmoid gate
    return total


def head_bytes(config, layout: WeightLayout) -> float:
    """The final norm and the LM head (tied embeddings: the embedding matrix, read as the head)."""
    return _norm_bytes(config, config.hidden_size, layout) + \
        config.vocab_size * config.hidden_size * bytes_per_weight(layout.dtype)


def fixed_weight_bytes(config, layout: WeightLayout) -> float:
    """The weights outside the layers: embeddings, final norm, LM head (once when tied)."""
    embed = config.vocab_size * config.hidden_size * bytes_per_weight(layout.dtype)
    return head_bytes(config, layout) + (0.0 if config.tie_word_embeddings else embed)


def layer_weight_bytes(config, layer: int, layout: WeightLayout) -> float:
    """Every weight of one layer, all its experts included."""
    total = attention_bytes(config, layout) + mlp_bytes(config, layer, layout)
    if config.moe_layers[layer]:
        total += config.num_experts * expert_bytes(config, layout)
    return total


def model_weight_bytes(config, layout: WeightLayout) -> float:
    """Every weight of the model as stored (what loading it costs in memory)."""
    return fixed_weight_bytes(config, layout) + sum(
        layer_weight_bytes(config, layer, layout) for layer in range(config.num_layers))


def kv_bytes_per_token(config, kv_elem_bytes: float) -> float:
    """K and V of one token in one layer."""
    return 2 * config.num_kv_heads * config.head_dim * kv_elem_bytes


def kv_read_bytes(config, context_lens: Sequence[int], kv_elem_bytes: float) -> float:
    """The KV one decode step attends over: per layer and sequence, its cached tokens (the new
    one included), at most the layer's sliding window."""
    per_token = kv_bytes_per_token(config, kv_elem_bytes)
    total = 0.0
    for window in config.sliding_windows:
        for length in context_lens:
            total += (length if window is None else min(length, window)) * per_token
    return total


def adapter_attention_bytes(config, rank: int, elem_bytes: float) -> float:
    """One adapter's attention A and B of one layer (q, k, v, o)."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, \
        config.num_kv_heads * config.head_dim
    return rank * ((h + q) + 2 * (h + kv) + (q + h)) * elem_bytes


def adapter_expert_bytes(config, rank: int, elem_bytes: float) -> float:
    """One (adapter, expert) pair: A13 [r, H], B13 [r, 2I], A2 [r, I], B2 [r, H]."""
    return rank * (2 * config.hidden_size + 3 * config.moe_intermediate_size) * elem_bytes


def adapter_bytes(config, rank: int, elem_bytes: float) -> float:
    """A rank-`rank` adapter on the attention and every expert of every layer (its file)."""
    moe_layers = sum(config.moe_layers)
    return config.num_layers * adapter_attention_bytes(config, rank, elem_bytes) + \
        moe_layers * config.num_experts * adapter_expert_bytes(config, rank, elem_bytes)


@dataclass
class StepBytes:
    """Bytes a decode step must read, by kind."""

    weights: float  # norms, attention, routers, shared/dense MLPs, embedding rows, LM head
    experts: float  # the routed experts the step's tokens selected
    kv: float
    lora: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.experts + self.kv + self.lora

    def roofline_ms(self, copy_rate: float | None) -> float | None:
        return None if not copy_rate else 1e3 * self.total / copy_rate


def decode_step_bytes(config, layout: WeightLayout, context_lens: Sequence[int],
                      experts_per_layer: Sequence[int], kv_elem_bytes: float,
                      lora_rank: int = 0, adapters_per_layer: Sequence[int] = (),
                      pairs_per_layer: Sequence[int] = ()) -> StepBytes:
    """The bytes of one decode step of len(context_lens) sequences.

    experts_per_layer[l]: distinct experts the step's tokens selected in layer l (0 for a dense
    layer); adapters_per_layer / pairs_per_layer: distinct adapters among the step's tokens and
    distinct (adapter, expert) pairs they were routed to, per layer (LoRA bytes at lora_rank,
    stored in the model dtype)."""
    c = config
    if len(experts_per_layer) != c.num_layers:
        raise ValueError(f"experts_per_layer has {len(experts_per_layer)} entries for "
                         f"{c.num_layers} layers")
    elem = bytes_per_weight(layout.dtype)
    weights = len(context_lens) * c.hidden_size * elem + head_bytes(c, layout)
    experts = 0.0
    for layer in range(c.num_layers):
        weights += attention_bytes(c, layout) + mlp_bytes(c, layer, layout)
        experts += experts_per_layer[layer] * expert_bytes(c, layout)
    lora = 0.0
    if lora_rank:
        for layer in range(c.num_layers):
            if adapters_per_layer:
                lora += adapters_per_layer[layer] * adapter_attention_bytes(c, lora_rank, elem)
            if pairs_per_layer:
                lora += pairs_per_layer[layer] * adapter_expert_bytes(c, lora_rank, elem)
    return StepBytes(weights, experts, kv_read_bytes(c, context_lens, kv_elem_bytes), lora)


def _tensor_format(module: torch.nn.Module) -> str | None:
    """The storage format of a module's largest tensor: int8/uint8 codes are MXFP4 (blocks and
    scales), float8 is FP8, else the float dtype."""
    tensors = [*module.parameters(), *module.buffers()]
    if not tensors:
        return None
    largest = max(tensors, key=lambda t: t.numel() * t.element_size())
    if largest.dtype in (torch.uint8, torch.int8):
        return "mxfp4"
    if largest.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8"
    return _DTYPE_FORMATS.get(largest.dtype)


def stored_layout(model) -> WeightLayout:
    """The layout a built model really has, read from its tensors: the formats of the first
    MoE layer's experts and of the first layer's attention, and the embeddings' dtype."""
    base = dtype_format(model.model.embed_tokens.weight.dtype)
    layers = list(model.model.layers)
    dense = _tensor_format(layers[0].self_attn.qkv_proj) if layers else None
    experts = next((_tensor_format(layer.mlp.experts) for layer in layers
                    if hasattr(layer.mlp, "experts")), None)
    return WeightLayout(base, dense or base, experts or dense or base)
