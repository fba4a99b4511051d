"""AdapterPlan: where every LoRA matrix of an adapter lives in its saved files.

The native adapter cache copies rows straight out of the safetensors data, so the plan
describes each matrix as a strided 2D view (in elements) of a saved tensor:

* A views are [rank, in_dim]; B views are B transposed, [rank, out_dim] (the page pool stores
  both as rows of length in / out, see ARCHITECTURE.md);
* element (i, j) of a view is `flat[offset + i * row_stride + j * col_stride]`;
* `scale` multiplies the view when it is loaded: 1.0 for A, PEFT's scaling for B, so the
  scaling is folded once, into B;
* a fused expert tensor is one source for all its experts (`experts` of them from `expert`,
  each `expert_stride` elements on from the one before), not one per expert: registration
  stays a few milliseconds for a model of 32 experts in 24 layers. `per_expert_sources` gives
  the one-per-expert form.

A fused 3D gate_up target yields separate experts.gate and experts.up entries that share
the same A view; their B views pick gate / up output rows (halves, or even / odd rows for
GPT-OSS). Experts of a targeted layer that the adapter has no tensors for get no entry: their
delta is zero.

`load_adapter_plan` is the registration entry point: it reads adapter_config.json and the
safetensors headers only, and raises AdapterValidationError for anything we cannot serve.
Adapters of one recipe (the same adapter_config.json, safetensors headers and file sizes) for
one model have one plan but for their name and paths: the last PLAN_CACHE_SIZE plans are kept
by that structure, so a fleet's cold adapters register without parsing and checking it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from moelora.lora.config import AdapterConfig, load_adapter_config
from moelora.lora.patterns import PatternError
from moelora.lora.sites import (
    EXPERT_GATE,
    EXPERT_UP,
    FUSED_GATE_UP,
    LoraSiteSpec,
    PeftLayout,
    peft_layout_of,
    site_table,
)
from moelora.lora.targets import ALL_EXPERTS, TargetKey, classify_keys
from moelora.lora.validate import (
    AdapterValidationError,
    TensorHeader,
    check_dtype,
    check_rank,
    check_shape,
    read_header_bytes,
    read_safetensors_header,
)

PLAN_CACHE_SIZE = 64


@dataclass(frozen=True)
class MatrixSource:
    site: str
    layer: int
    expert: int  # 0 for dense sites
    is_b: bool  # False: A view [rank, in_dim]; True: B^T view [rank, out_dim]
    file_index: int  # into AdapterPlan.files
    tensor: str  # saved tensor name
    offset: int  # elements
    rows: int  # the rank
    cols: int
    row_stride: int  # elements
    col_stride: int  # elements
    scale: float  # multiply the view by this when loading
    experts: int = 1  # the same view of experts expert, expert + 1, ...
    expert_stride: int = 0  # elements from one expert's view to the next one's

    def per_expert(self) -> list[MatrixSource]:
        """This source as one source per expert."""
        if self.experts == 1:
            return [self]
        return [replace(self, expert=self.expert + e, offset=self.offset + e * self.expert_stride,
                        experts=1, expert_stride=0) for e in range(self.experts)]


def per_expert_sources(sources) -> list[MatrixSource]:
    """`sources` with one source per (site, layer, expert, A or B)."""
    return [one for source in sources for one in source.per_expert()]


@dataclass
class AdapterPlan:
    name: str
    path: Path
    files: list[Path]
    ranks: dict[str, list[int]]  # site -> per-layer rank, 0 where not targeted
    sources: list[MatrixSource] = field(default_factory=list)
    tensors: dict[str, TensorHeader] = field(default_factory=dict)  # dtype, byte offset
    sites: dict[str, LoraSiteSpec] = field(default_factory=dict)  # the model's, by name

    @property
    def max_rank(self) -> int:
        return max((r for per_layer in self.ranks.values() for r in per_layer), default=0)


def load_adapter_plan(
    adapter_dir: str | Path,
    sites,
    layout: PeftLayout | str,
    *,
    name: str | None = None,
    max_lora_rank: int | None = None,
) -> AdapterPlan:
    """Validate a PEFT adapter directory against a model's LoRA sites and plan its loads.
    `layout`: the model class's peft_layout, or its architecture family name."""
    path = Path(adapter_dir)
    name = name or path.name
    config = load_adapter_config(path, name)
    files = _adapter_files(path, name)
    key = _structure_key(path, files, sites, layout, max_lora_rank)
    known = _PLANS.get(key, name, path, files)
    if known is not None:
        return known
    plan = _build_plan(name, path, files, config, sites, layout, max_lora_rank)
    _PLANS.put(key, plan)
    return plan


def _build_plan(name, path, files, config, sites, layout, max_lora_rank) -> AdapterPlan:
    tensors: dict[str, TensorHeader] = {}
    file_of: dict[str, int] = {}
    for index, file in enumerate(files):
        for key, header in read_safetensors_header(file, name).items():
            if key in tensors:
                raise AdapterValidationError(name, f"tensor {key!r} appears in two files")
            check_dtype(name, header)
            tensors[key] = header
            file_of[key] = index
    if not tensors:
        raise AdapterValidationError(name, "the adapter has no tensors")
    if isinstance(layout, str):
        layout = peft_layout_of(layout)
    try:
        targets = classify_keys(sorted(tensors), layout, config, name)
        builder = _PlanBuilder(name, config, site_table(sites), layout, tensors, file_of)
        plan = AdapterPlan(
            name, path, files, builder.empty_ranks(), tensors=tensors, sites=builder.sites
        )
        for a_key, b_key in _pair_targets(targets, name):
            builder.add(plan, a_key, b_key, max_lora_rank)
    except PatternError as e:  # rank_pattern / alpha_pattern matching beyond its bounds
        raise AdapterValidationError(name, str(e)) from None
    except AdapterValidationError as e:
        raise _name_the_base_model(e, config) from None
    return plan


class _PlanCache:
    """Plans by structure key (see the module docstring), the last PLAN_CACHE_SIZE; a hit is
    the plan with the new adapter's name and paths. Safe from any thread."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, AdapterPlan] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple | None, name: str, path: Path, files: list[Path]
            ) -> AdapterPlan | None:
        if key is None:
            return None
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
        if plan is None:
            return None
        return _own_copy(plan, name=name, path=path, files=list(files))

    def put(self, key: tuple | None, plan: AdapterPlan) -> None:
        if key is None:
            return
        kept = _own_copy(plan)  # the caller's plan stays the caller's
        with self._lock:
            self._plans[key] = kept
            self._plans.move_to_end(key)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_PLANS = _PlanCache()


def _own_copy(plan: AdapterPlan, **changes) -> AdapterPlan:
    """`plan` with `changes` and its own ranks and sources lists (the rest is never changed)."""
    return replace(plan, ranks={site: list(ranks) for site, ranks in plan.ranks.items()},
                   sources=list(plan.sources), **changes)


def _structure_key(path: Path, files: list[Path], sites, layout, max_lora_rank) -> tuple | None:
    """What an adapter's plan depends on besides its name and paths: a digest of its config
    and its files' names, headers and sizes, and the model's sites, layout and max rank. None
    where a file cannot be read (the full parse then names the problem)."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        digest.update((path / "adapter_config.json").read_bytes())
        for file in files:
            header, size = read_header_bytes(file, "")
            digest.update(b"%s\0%d\0%d\0" % (file.name.encode(), size, len(header)) + header)
    except (OSError, AdapterValidationError):
        return None
    return digest.digest(), tuple(site_table(sites).values()), repr(layout), max_lora_rank


def _name_the_base_model(error: AdapterValidationError, config: AdapterConfig):
    """A module or shape this model lacks most often means an adapter of another base model:
    the message says which model the adapter was trained on."""
    if config.base_model is None or not any(
            word in error.problem for word in ("cannot adapt", "shape", "no site", "layer")):
        return error
    return AdapterValidationError(
        error.adapter, f"{error.problem}; the adapter was trained on base model "
                       f"{config.base_model!r}: an adapter of another model?")


def _adapter_files(path: Path, adapter: str) -> list[Path]:
    # Messages name the directory by its last part only: no server path reaches a client.
    if "\x00" in str(path):
        raise AdapterValidationError(adapter, "the adapter path holds a NUL byte")
    if not path.is_dir():
        raise AdapterValidationError(adapter, f"adapter directory {path.name!r} does not exist "
                                              f"or is not a directory")
    files = sorted(path.glob("adapter_model*.safetensors"))
    if not files:
        if (path / "adapter_model.bin").exists():
            raise AdapterValidationError(
                adapter, "adapter_model.bin (pickle) is not supported; save with safetensors"
            )
        raise AdapterValidationError(adapter, f"no adapter_model.safetensors in {path.name!r}")
    return files


def _pair_targets(targets: list[TargetKey], adapter: str) -> list[tuple[TargetKey, TargetKey]]:
    halves: dict[tuple, dict[bool, TargetKey]] = {}
    for t in targets:
        slot = halves.setdefault((t.site, t.layer, t.expert), {})
        if t.is_b in slot:
            raise AdapterValidationError(
                adapter, f"tensors {slot[t.is_b].key!r} and {t.key!r} target the same matrix"
            )
        slot[t.is_b] = t
    pairs = []
    for slot in halves.values():
        if len(slot) != 2:
            (only,) = slot.values()
            missing = "lora_A" if only.is_b else "lora_B"
            raise AdapterValidationError(
                adapter, f"tensor {only.key!r} has no matching {missing} tensor (missing A or B)"
            )
        pairs.append((slot[False], slot[True]))
    return pairs


class _PlanBuilder:
    """Checks one A/B pair against the model's sites and appends its views."""

    def __init__(self, adapter, config: AdapterConfig, sites, layout: PeftLayout, tensors,
                 file_of):
        self.adapter = adapter
        self.config = config
        self.sites: dict[str, LoraSiteSpec] = sites
        self.layout = layout
        self.tensors = tensors
        self.file_of = file_of
        self.expert_ranks: dict[tuple[str, int], tuple[int, str]] = {}
        self.emitted: dict[tuple[str, int, int], str] = {}  # (site, layer, expert) -> A key

    def empty_ranks(self) -> dict[str, list[int]]:
        return {name: [0] * spec.num_layers for name, spec in self.sites.items()}

    def _site(self, name: str, t: TargetKey) -> LoraSiteSpec:
        spec = self.sites.get(name)
        if spec is None:
            raise AdapterValidationError(
                self.adapter,
                f"tensor {t.key!r} targets site {name!r}, which this model does "
                f"not have (model sites: {sorted(self.sites)})",
            )
        if t.layer >= spec.num_layers:
            raise AdapterValidationError(
                self.adapter,
                f"tensor {t.key!r} targets layer {t.layer}, but the model has "
                f"{spec.num_layers} layers",
            )
        if not spec.has_layer(t.layer):
            raise AdapterValidationError(
                self.adapter,
                f"tensor {t.key!r} targets site {name!r} in layer {t.layer}, but this model has "
                f"that site only in layers {list(spec.layers)}",
            )
        if t.expert != ALL_EXPERTS and t.expert >= spec.num_experts:
            raise AdapterValidationError(
                self.adapter,
                f"tensor {t.key!r} targets expert {t.expert}, but the model has "
                f"{spec.num_experts} experts",
            )
        return spec

    def add(self, plan: AdapterPlan, a: TargetKey, b: TargetKey, max_lora_rank) -> None:
        a_t, b_t = self.tensors[a.key], self.tensors[b.key]
        for t in (a_t, b_t):
            if len(t.shape) != 2:
                raise AdapterValidationError(
                    self.adapter, f"tensor {t.name!r} has {len(t.shape)} dims, expected 2"
                )
        layers = self.config.layers_to_transform
        if layers is not None and a.expert != ALL_EXPERTS and a.layer not in layers:
            raise AdapterValidationError(
                self.adapter,
                f"tensor {a.key!r} is in layer {a.layer}, outside layers_to_transform={layers}",
            )
        if a.site == FUSED_GATE_UP:
            gate, up = self._site(EXPERT_GATE, a), self._site(EXPERT_UP, a)
            if (gate.in_dim, gate.out_dim, gate.num_experts) != (
                up.in_dim, up.out_dim, up.num_experts,
            ):  # fmt: skip
                raise AdapterValidationError(
                    self.adapter,
                    "model sites experts.gate and experts.up differ in shape; "
                    f"cannot split fused tensor {b.key!r}",
                )
            specs = [gate, up]
            out_total = gate.out_dim + up.out_dim
        else:
            specs = [self._site(a.site, a)]
            out_total = specs[0].out_dim
        spec = specs[0]
        num_experts = spec.num_experts if a.expert == ALL_EXPERTS else 1
        rank, remainder = divmod(a_t.shape[0], num_experts)
        where = f"tensor {a.key!r}"
        if remainder:
            raise AdapterValidationError(
                self.adapter,
                f"{where} has {a_t.shape[0]} rows, not a multiple of the "
                f"model's {num_experts} experts",
            )
        check_rank(self.adapter, rank, max_lora_rank, where)
        what = f"site {a.site} (in_dim={spec.in_dim}, out_dim={out_total}, experts={num_experts})"
        check_shape(self.adapter, a_t, (num_experts * rank, spec.in_dim), what)
        check_shape(self.adapter, b_t, (out_total, num_experts * rank), what)
        expected_rank = self.config.rank_for(a.module_key)
        if rank != expected_rank:
            raise AdapterValidationError(
                self.adapter,
                f"{where} has rank {rank} but adapter_config.json gives "
                f"{a.module_key} rank {expected_rank} (r / rank_pattern); its scaling "
                "would be wrong",
            )
        scale = self.config.scale_for(a.module_key)
        for part, site in enumerate(specs):
            self._set_rank(plan, site.name, a, rank)
            experts = range(num_experts) if a.expert == ALL_EXPERTS else [a.expert]
            for e in experts:
                # A fused 3D target and a per-expert one may both claim the same matrix.
                first = self.emitted.setdefault((site.name, a.layer, e), a.key)
                if first != a.key:
                    raise AdapterValidationError(
                        self.adapter,
                        f"tensors {first!r} and {a.key!r} both target {site.name} of layer "
                        f"{a.layer}, expert {e}",
                    )
            self._emit(plan, site, a, b, rank, num_experts, part, len(specs), scale)

    def _set_rank(self, plan: AdapterPlan, site: str, t: TargetKey, rank: int) -> None:
        # The row tables hold one rank per (site, layer); per-expert adapters must agree.
        previous = self.expert_ranks.setdefault((site, t.layer), (rank, t.key))
        if previous[0] != rank:
            raise AdapterValidationError(
                self.adapter,
                f"tensor {t.key!r} has rank {rank} but {previous[1]!r} of the "
                f"same layer and site has rank {previous[0]}; ranks must agree across experts",
            )
        plan.ranks[site][t.layer] = rank

    def _emit(self, plan, site, a, b, rank, num_experts, part, parts, scale) -> None:
        # A [E*r, in]: expert-major rows. B [out_total, E*r]: rank-major columns (k*E + e).
        # A 3D target is one source per matrix for all E experts; a per-expert one, for its own.
        in_dim, out_dim = site.in_dim, site.out_dim
        stacked = num_experts * rank
        is_3d = a.expert == ALL_EXPERTS
        if parts == 1:
            first_row, row_step = 0, 1
        elif self.layout.gate_up_interleaved:
            first_row, row_step = part, 2  # GPT-OSS: gate rows 0, 2, ...; up rows 1, 3, ...
        else:
            first_row, row_step = part * out_dim, 1  # [gate; up] halves
        common = {"site": site.name, "layer": a.layer, "expert": 0 if is_3d else a.expert,
                  "rows": rank, "experts": num_experts if is_3d else 1}
        plan.sources.append(MatrixSource(
            **common, is_b=False, file_index=self.file_of[a.key], tensor=a.key, offset=0,
            cols=in_dim, row_stride=in_dim, col_stride=1, scale=1.0,
            expert_stride=rank * in_dim if is_3d else 0,
        ))  # fmt: skip
        plan.sources.append(MatrixSource(
            **common, is_b=True, file_index=self.file_of[b.key], tensor=b.key,
            offset=first_row * stacked, cols=out_dim, row_stride=num_experts,
            col_stride=row_step * stacked, scale=scale, expert_stride=1 if is_3d else 0,
        ))  # fmt: skip
