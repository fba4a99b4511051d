"""adapter_config.json: the LoRA hyper-parameters we honour and the features we refuse.

Pattern matching follows peft 0.21 (`peft.utils.other.get_pattern_key`): the key to match is
the module's name inside the model (`model.layers.3.self_attn.q_proj`; for a targeted 3D
parameter, the module name plus the parameter name, `model.layers.3.mlp.experts.down_proj`),
and a pattern key `k` matches when `re.match(rf"(.*\\.)?({k})$", name)`; the first matching key
in the dict's order wins, otherwise the global `r` / `lora_alpha` apply. The keys are matched by
moelora.lora.patterns, in time linear in the name and bounded per adapter (a hostile key cannot
stall the server); the file is parsed with its nesting depth bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from moelora.lora.patterns import PatternError, PatternSet
from moelora.lora.validate import AdapterValidationError, loads_bounded

# Options that change what the adapter computes in ways a plain B @ A delta cannot express.
_REFUSED_VARIANTS = {
    "use_dora": "DoRA (use_dora=true) is not supported; merge the adapter or retrain as LoRA",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D base layers) is not supported",
}
# These initialisations also rewrite the base weights; unless the adapter was converted back
# on save (which resets init_lora_weights to true) its delta is relative to another base.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq")


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    target_parameters: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    # the model it was trained on (PEFT's base_model_name_or_path), for messages only
    base_model: str | None = None
    # compiled rank_pattern / alpha_pattern keys (PatternError for a key beyond the bounds)
    rank_keys: PatternSet = field(init=False, repr=False, compare=False)
    alpha_keys: PatternSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_keys", PatternSet(self.rank_pattern))
        object.__setattr__(self, "alpha_keys", PatternSet(self.alpha_pattern))

    def rank_for(self, module_key: str) -> int:
        """Raises PatternError when matching goes past its bounds."""
        key = self.rank_keys.lookup(module_key)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_key: str) -> float:
        key = self.alpha_keys.lookup(module_key)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module_key: str) -> float:
        """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA (per-pattern r, alpha)."""
        r = self.rank_for(module_key)
        alpha = self.alpha_for(module_key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets_parameter(self, module_key: str, param_name: str) -> bool:
        """Whether `target_parameters` selects `param_name` of the module `module_key`
        (PEFT: exact full name, or the full name ends with "." + entry)."""
        full = f"{module_key}.{param_name}"
        return any(full == t or full.endswith("." + t) for t in self.target_parameters)


MAX_CONFIG_BYTES = 16 << 20  # adapter_config.json files are a few KiB


def load_adapter_config(adapter_dir: str | Path, adapter: str) -> AdapterConfig:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterValidationError(adapter, f"missing {path.name}") from None
    except OSError as e:
        raise AdapterValidationError(adapter, f"cannot read {path.name}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterValidationError(adapter, f"{path.name} is larger than {MAX_CONFIG_BYTES} "
                                              f"bytes")
    raw = loads_bounded(data, adapter, path.name)
    if not isinstance(raw, dict):
        raise AdapterValidationError(adapter, f"{path.name} is not a JSON object")
    return parse_adapter_config(raw, adapter)


def parse_adapter_config(raw: dict, adapter: str) -> AdapterConfig:
    def fail(problem: str):
        raise AdapterValidationError(adapter, problem)

    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        fail(f"peft_type is {peft_type!r}; only LORA adapters are supported")
    for option, why in _REFUSED_VARIANTS.items():
        if raw.get(option):
            fail(why)
    if raw.get("lora_bias"):
        fail("lora_bias=true (trained LoRA bias) is not supported")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        fail(f"bias={bias!r} (trained base biases) is not supported; only bias='none'")
    if raw.get("modules_to_save"):
        fail(
            f"modules_to_save={raw['modules_to_save']} (fully fine-tuned modules) is not "
            "supported; only low-rank deltas can be served per request"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        fail(
            f"init_lora_weights={init!r} modifies the base weights; save the adapter with "
            "path_initial_model_for_weight_conversion to convert it to plain LoRA"
        )

    r = raw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        fail(f"r={r!r} must be a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        fail(f"lora_alpha={alpha!r} must be a finite number")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for name, pattern, kinds in (
        ("rank_pattern", rank_pattern, (int,)),
        ("alpha_pattern", alpha_pattern, (int, float)),
    ):
        if not isinstance(pattern, dict):
            fail(f"{name} must be a mapping of module pattern to value")
        for key, value in pattern.items():
            if not isinstance(value, kinds) or isinstance(value, bool):
                fail(f"{name}[{key!r}]={value!r} must be a number")
            if not math.isfinite(value):
                fail(f"{name}[{key!r}]={value!r} must be finite")
            if name == "rank_pattern" and value < 1:
                fail(f"rank_pattern[{key!r}]={value} must be >= 1")

    target_modules = raw.get("target_modules")
    if target_modules is not None and not isinstance(target_modules, (str, list)):
        fail("target_modules must be a list of names or a regex string")
    target_parameters = raw.get("target_parameters") or []
    if not isinstance(target_parameters, list):
        fail("target_parameters must be a list of parameter names")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list) or not all(isinstance(i, int) for i in layers)
    ):
        fail("layers_to_transform must be an int or a list of ints")
    try:  # compiles the pattern keys
        return AdapterConfig(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
            target_modules=target_modules,
            target_parameters=list(target_parameters),
            layers_to_transform=layers or None,
            base_model=_base_model_name(raw.get("base_model_name_or_path")),
        )
    except PatternError as e:
        fail(str(e))


def _base_model_name(value) -> str | None:
    """The base model's name as a message may show it: its last path part (a local training
    path names no server file but is not the client's business), at most 120 characters."""
    if not isinstance(value, str) or not value.strip():
        return None
    name = value.strip().rstrip("/")
    if name.startswith(("/", ".", "~")):
        name = name.rsplit("/", 1)[-1]
    return name[:120]
