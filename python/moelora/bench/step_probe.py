"""Looking inside an engine's decode steps without changing the engine: wall and GPU time per
step, kernel launches per step, and the experts (and adapter, expert pairs) a step's routing
selected.

StepTimer wraps the engine's ModelRunner from outside, at the calls every way of running a step
makes (synchronous, async scheduling, a parallel engine's rank 0): `prepare` marks a step that
runs the model and says what it holds, and engine.step() is timed on the host around it. On a
GPU, CUDA events bracket the model run, from just before `forward` or `run_model` (graph replay
or eager forward) to the end of `logits` (the LM head), so step_gpu_ms is the device time of the
forward pass as the engine runs it. The events are read after the run, so timing adds no
synchronisation to the steps.

count_step_kernels profiles one engine.step() with torch.profiler and counts the GPU kernels
(and, apart, the memcpy/memset operations) it ran: the decode graph's kernels when the step
replays a graph, the eager launches otherwise.

RoutingCapture hooks every MoE layer's router for one eager step (the decode graph is set aside
for that step: a replay runs no Python, so no hook would fire) and records, per layer, the
distinct experts the step's tokens selected and the distinct (adapter slot, expert) pairs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One engine.step() that ran the model."""

    wall_s: float = 0.0
    num_seqs: int = 0
    num_tokens: int = 0
    is_decode: bool = False  # every sequence of the step computed exactly one token
    start: object = None  # torch.cuda.Event
    end: object = None
    gpu_ms: float | None = None


@dataclass
class StepTimer:
    """Times every engine.step() that runs the model, as StepRecords in `steps`."""

    engine: object
    steps: list[StepRecord] = field(default_factory=list)
    _current: StepRecord | None = None

    _WRAPPED = ("prepare", "forward", "run_model", "logits")

    def __post_init__(self) -> None:
        runner = self.engine.runner
        self._on_gpu = self.engine.device.type == "cuda"
        self._originals = {name: getattr(runner, name) for name in self._WRAPPED}
        for name in self._WRAPPED:  # instance attributes shadow the methods
            setattr(runner, name, getattr(self, f"_timed_{name}"))

    def remove(self) -> None:
        runner = self.engine.runner
        for name in self._WRAPPED:
            delattr(runner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _timed_prepare(self, batch, *args, **kwargs):
        self._current = StepRecord(num_seqs=len(batch.seqs),
                                   num_tokens=sum(batch.num_new_tokens),
                                   is_decode=all(n == 1 for n in batch.num_new_tokens))
        return self._originals["prepare"](batch, *args, **kwargs)

    def _start_event(self) -> None:
        if self._on_gpu and self._current is not None and self._current.start is None:
            self._current.start = torch.cuda.Event(enable_timing=True)
            self._current.start.record()

    def _timed_forward(self, *args, **kwargs):
        self._start_event()
        return self._originals["forward"](*args, **kwargs)

    def _timed_run_model(self, *args, **kwargs):
        self._start_event()
        return self._originals["run_model"](*args, **kwargs)

    def _timed_logits(self, hidden):
        logits = self._originals["logits"](hidden)
        record = self._current
        if self._on_gpu and record is not None and record.start is not None:
            record.end = torch.cuda.Event(enable_timing=True)
            record.end.record()
        return logits

    def step(self):
        """engine.step(), timed; a step that ran the model is appended to `steps`."""
        self._current = None
        start = time.perf_counter()
        outputs = self.engine.step()
        wall = time.perf_counter() - start
        if self._current is not None:
            self._current.wall_s = wall
            self.steps.append(self._current)
        return outputs

    def finish(self) -> list[StepRecord]:
        """Reads the GPU times (one synchronisation, after the run) and returns the steps."""
        if self._on_gpu:
            torch.cuda.synchronize(self.engine.device)
            for record in self.steps:
                if record.start is not None and record.end is not None and record.gpu_ms is None:
                    record.gpu_ms = record.start.elapsed_time(record.end)
        return self.steps


def steady_decode_steps(steps: list[StepRecord], num_seqs: int) -> list[StepRecord]:
    """The pure decode steps that ran all `num_seqs` sequences (the batch at steady state)."""
    return [s for s in steps if s.is_decode and s.num_seqs == num_seqs]


def count_step_kernels(engine) -> tuple[int | None, int | None]:
    """(GPU kernels, memcpy/memset operations) of one engine.step(); (None, None) without a
    GPU."""
    if engine.device.type != "cuda":
        engine.step()
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize(engine.device)
    kernels, copies = Counter(), Counter()
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        is_copy = event.name.startswith(("Memcpy", "Memset"))
        (copies if is_copy else kernels)[event.name] += 1
    return sum(kernels.values()), sum(copies.values())


def _routers(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router module) of every MoE layer."""
    found = []
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        name = getattr(mlp, "router_name", None)
        router = getattr(mlp, name, None) if name else None
        if router is not None:
            found.append((index, router))
    return found


def _expert_ids(output) -> torch.Tensor | None:
    """The integer tensor (top-k expert ids) among a router's outputs."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            return item
    return None


@dataclass
class Routing:
    """What one step's routing selected, per layer (0 for a dense layer)."""

    experts_per_layer: list[int]
    pairs_per_layer: list[int]  # distinct (adapter slot, expert), tokens with an adapter only
    adapters_per_layer: list[int]  # distinct adapter slots among the step's tokens
    counted: bool  # False: no router reported its ids; the counts are upper bounds


class RoutingCapture:
    """Records the routing of the next engine.step(), run eagerly (see the module doc)."""

    def __init__(self, engine):
        self.engine = engine
        self.ids: dict[int, torch.Tensor] = {}
        self.token_slot: torch.Tensor | None = None
        self.num_tokens = 0

    def step(self) -> Routing:
        runner = self.engine.runner
        graphs, metadata = runner.graphs, runner._metadata
        hooks = []

        def keep_meta(step):  # every eager step's (ids, StepMetadata) are built here
            input_ids, meta = metadata(step)
            self.num_tokens = int(input_ids.shape[0])
            self.token_slot = meta.token_slot
            return input_ids, meta

        wrapped = []
        for layer, router in _routers(runner.model):
            if hasattr(router, "route"):  # MoeBlock calls route(), not forward()
                route = router.route

                def keep_route(x, route=route, layer=layer):
                    routing = route(x)
                    self.ids[layer] = routing.topk_ids.detach().clone()
                    return routing
                router.route = keep_route
                wrapped.append(router)
                continue

            def keep(module, args, output, layer=layer):
                ids = _expert_ids(output)
                if ids is not None:
                    self.ids[layer] = ids.detach().clone()
            hooks.append(router.register_forward_hook(keep))
        runner.graphs = None
        runner._metadata = keep_meta
        try:
            self.engine.step()
        finally:
            runner.graphs = graphs
            del runner._metadata
            for hook in hooks:
                hook.remove()
            for router in wrapped:
                del router.route
        return self.routing()

    def routing(self) -> Routing:
        config = self.engine.model.config
        slots = self.token_slot.long().cpu() if self.token_slot is not None else None
        adapters = 0 if slots is None else int(torch.unique(slots[slots >= 0]).numel())
        experts, pairs = [], []
        counted = bool(self.ids)
        for layer in range(config.num_layers):
            if not config.moe_layers[layer]:
                experts.append(0)
                pairs.append(0)
                continue
            ids = self.ids.get(layer)
            if ids is None:  # no router output seen: every expert the tokens could select
                bound = min(config.num_experts, self.num_tokens * config.top_k)
                experts.append(bound)
                pairs.append(min(bound * adapters, config.num_experts * adapters))
                counted = False
                continue
            ids = ids.long().cpu()
            experts.append(int(torch.unique(ids).numel()))
            if slots is None:
                pairs.append(0)
                continue
            mask = slots[: ids.shape[0]] >= 0
            keyed = slots[: ids.shape[0]][mask, None] * config.num_experts + ids[mask]
            pairs.append(int(torch.unique(keyed).numel()))
        return Routing(experts, pairs, [adapters] * config.num_layers, counted)
