"""ModelConfig: one normalised, validated description of every supported architecture.

Each family parses its own HF config.json dict into a ModelConfig (see `config_from_hf` in the
family modules); the shared helpers here read the fields whose spelling varies across
transformers versions (rope parameters, sliding-window layers, eos ids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "llama3", "yarn")
ROUTER_KINDS = ("softmax_topk", "topk_softmax")
EXPERT_ACTS = ("silu", "gpt_oss")
EXPERT_FORMATS = ("dense", "mxfp4", "fp8")  # how expert stacks are stored (models/moe.py)
QK_NORMS = (None, "head", "full")


@dataclass
class ModelConfig:
    architecture: str  # HF architectures[0], e.g. "MixtralForCausalLM"
    family: str  # registry key of the model class, e.g. "mixtral"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0  # dense MLP width (dense layers); 0 when the model has none
    num_experts: int = 0  # 0: dense model
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert; 0: none
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    norm_topk_prob: bool = True
    router: str = "softmax_topk"  # softmax over all then top-k, or top-k logits then softmax
    router_bias: bool = False
    expert_act: str = "silu"  # silu(gate) * up, or GPT-OSS clamped swiglu
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Expert stacks as stored: "dense" (the model's dtype), "mxfp4" (GPT-OSS blocks + E8M0
    # scales) or "fp8" (e4m3 with float32 scales over expert_fp8_block tiles); the MoE kernels
    # read them as they are. Checkpoints set it at load; config_from_hf leaves "dense".
    expert_format: str = "dense"
    expert_fp8_block: tuple[int, int] = (128, 128)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # "head": RMSNorm over head_dim; "full": over the projection
    clip_qkv: float | None = None
    attention_sinks: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None: full attention
    rms_norm_eps: float = 1e-6
    norm_weight_fp32: bool = False  # GPT-OSS keeps norm weights and products in float32
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{self.architecture}: {name} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.architecture}: num_heads {self.num_heads} is not a multiple "
                             f"of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.architecture}: rotary embeddings need an even head_dim, "
                             f"got {self.head_dim}")
        if not self.moe_layers:
            self.moe_layers = tuple([self.num_experts > 0] * self.num_layers)
        self.moe_layers = tuple(bool(m) for m in self.moe_layers)
        if not self.sliding_windows:
            self.sliding_windows = tuple([None] * self.num_layers)
        self.sliding_windows = tuple(self.sliding_windows)
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"{self.architecture}: moe_layers has {len(self.moe_layers)} "
                             f"entries for {self.num_layers} layers")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"{self.architecture}: sliding_windows has "
                             f"{len(self.sliding_windows)} entries for {self.num_layers} layers")
        for w in self.sliding_windows:
            if w is not None and w <= 0:
                raise ValueError(f"{self.architecture}: sliding window must be positive, got {w}")
        if any(self.moe_layers):
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ValueError(f"{self.architecture}: MoE layers need num_experts and "
                                 f"moe_intermediate_size > 0")
            if not 0 < self.top_k <= self.num_experts:
                raise ValueError(f"{self.architecture}: top_k {self.top_k} must be in "
                                 f"[1, num_experts={self.num_experts}]")
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            raise ValueError(f"{self.architecture}: dense MLP layers need intermediate_size > 0")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"{self.architecture}: router {self.router!r} not in {ROUTER_KINDS}")
        if self.expert_act not in EXPERT_ACTS:
            raise ValueError(f"{self.architecture}: expert_act {self.expert_act!r} not in "
                             f"{EXPERT_ACTS}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"{self.architecture}: qk_norm {self.qk_norm!r} not in {QK_NORMS}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"{self.architecture}: rope type {self.rope_type!r} is not "
                             f"supported (supported: {ROPE_TYPES})")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ValueError(f"{self.architecture}: clip_qkv must be positive, got {self.clip_qkv}")

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    def with_num_layers(self, num_layers: int) -> ModelConfig:
        """A copy with only the first `num_layers` layers (benchmarks build fewer layers)."""
        if not 0 < num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.num_layers}], got {num_layers}")
        return dataclasses.replace(
            self, num_layers=num_layers, moe_layers=self.moe_layers[:num_layers],
            sliding_windows=self.sliding_windows[:num_layers],
        )


# ---- helpers for the families' config_from_hf ----------------------------------------------


def head_dim_of(hf: dict) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def rope_of(hf: dict, default_theta: float = 10000.0) -> dict[str, Any]:
    """rope_type / rope_theta / params from transformers 5 `rope_parameters` or 4 `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", default_theta)))
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings",
                                 hf.get("max_position_embeddings", 4096)))
    return {"rope_type": rope_type, "rope_theta": theta, "rope_params": params,
                "max_position_embeddings": int(hf.get("max_position_embeddings", 4096))}


def sliding_windows_of(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window, as HF's mask functions use it (None: full attention)."""
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False or not window:
        window = None
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) < num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        if window is None and "sliding_attention" in layer_types:
            raise ValueError("layer_types names sliding_attention layers but sliding_window "
                             "is not set")
        return tuple(window if t == "sliding_attention" else None for t in layer_types[:num_layers])
    return tuple([window] * num_layers)


def sparse_layers_of(hf: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen-MoE rule: MoE unless in mlp_only_layers or off the decoder_sparse_step grid."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    return tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
                 for i in range(num_layers))


def common_of(hf: dict, family: str) -> dict[str, Any]:
    """Fields every family reads the same way."""
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{family}: hidden_act {act!r} is not supported (only silu)")
    num_layers = int(hf["num_hidden_layers"])
    return dict(
        architecture=(hf.get("architectures") or [family])[0],
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=num_layers,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=head_dim_of(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
        bos_token_id=hf.get("bos_token_id"),
        sliding_windows=sliding_windows_of(hf, num_layers),
        **rope_of(hf),
    )
