"""The engine is handed an executor (engine/executor.py) and talks to nothing else that runs the
model; the parallel runtime (moelora.distributed) is never imported by the engine.

- every module imports in a fresh interpreter, the engine's modules without pulling in
  moelora.distributed, and the module-level imports of the package form no cycle;
- the default executor is one process, and its step is the runner's own method (no layer in
  between); an executor handed in is driven through the interface alone;
- EngineConfig.synthetic_expert_weights reaches build_synthetic through the executor.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import moelora
import pytest
import torch
from moelora import LLM, SamplingParams
from moelora.engine.config import EngineConfig
from moelora.engine.executor import UniProcExecutor
from moelora.engine.llm_engine import LLMEngine
from moelora.engine.model_runner import ModelRunner

# The package these tests import: the installed one in CI (with its _C), the source tree in a
# developer build.
PACKAGE = Path(moelora.__file__).resolve().parent
TINY = {"device": "cpu", "dtype": "float32", "synthetic_num_layers": 2,
        "pool_memory_bytes": 16 << 20, "load_progress": False}
PROMPTS = [[5, 9, 33, 2], [7], [11, 12, 13, 14, 15, 16, 17]]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (engine/ is a namespace package)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, modules, top_level_only: bool) -> set[str]:
    """The package's modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found - {name}


def _raw_imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_module_level_imports_form_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules, True) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_engine_never_imports_the_parallel_runtime():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("moelora.engine."):
            anywhere = _imports(path, name, modules, False)
            assert not {m for m in anywhere if m.startswith("moelora.distributed")}, name
            raw = _raw_imports(path)
            assert not {m for m in raw if m.startswith(("torch.distributed", "moelora.distrib"))}, name


def test_every_module_imports_in_a_fresh_interpreter():
    """The engine's modules (and the models, adapters and ops they stand on) first: none of them
    may pull in moelora.distributed; then everything else."""
    names = sorted(_modules())
    first = [n for n in names if n.split(".")[1:2] in (["engine"], ["models"], ["lora"], ["ops"])]
    script = (
        "import importlib, sys\n"
        f"for name in {first!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('moelora.distributed'))\n"
        "assert not leaked, leaked\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout


def _tokens(engine_or_llm, max_tokens=6):
    llm = engine_or_llm
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _engine_tokens(engine, max_tokens=6):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(PROMPTS))]


def test_default_executor_runs_the_step_in_one_call():
    engine = LLMEngine(EngineConfig("synthetic:tiny-moe", **TINY))
    executor = engine.executor
    assert isinstance(executor, UniProcExecutor)
    # the engine's step calls the runner's own method: no executor layer in between
    assert executor.execute.__func__ is ModelRunner.execute
    assert executor.execute.__self__ is engine.runner is executor.runner
    assert engine.model is executor.model and engine.memory is executor.memory
    assert engine.kv.pool is executor.kv_pool is engine.memory.pool
    tokens = _engine_tokens(engine)
    engine.shutdown()
    assert executor.model is None and executor.memory is None and engine.model is None
    assert engine.adapters.cache is None
    engine.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
    handed = EngineConfig("synthetic:tiny-moe", **TINY)
    assert _engine_tokens(LLMEngine(handed, UniProcExecutor(handed))) == tokens


class CountingExecutor(UniProcExecutor):
    """An executor of the test's own: the engine must drive it through the interface only."""

    def __init__(self, config):
        super().__init__(config)
        self.steps = 0
        self.shutdowns = 0
        del self.execute  # the class's method below, not the runner's

    def execute(self, batch, slot_of):
        self.steps += 1
        return self.runner.execute(batch, slot_of)

    def shutdown(self):
        self.shutdowns += 1
        super().shutdown()


def test_a_handed_executor_is_driven_and_shut_down():
    config = EngineConfig("synthetic:tiny-moe", **TINY)
    executor = CountingExecutor(config)
    engine = LLMEngine(config, executor)
    tokens = _engine_tokens(engine)
    assert executor.steps == engine.stats["steps"] > 0
    assert all(len(t) == 6 for t in tokens)
    engine.shutdown()
    engine.shutdown()
    assert executor.shutdowns == 1


def test_executor_and_engine_configs_must_match():
    config = EngineConfig("synthetic:tiny-moe", **TINY)
    executor = UniProcExecutor(config)
    with pytest.raises(ValueError, match="built for another EngineConfig"):
        LLMEngine(EngineConfig("synthetic:tiny-moe", **TINY), executor)
    executor.shutdown()


def test_parallel_config_needs_the_multi_process_executor():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .*MultiProcExecutor"):
        LLMEngine(EngineConfig("synthetic:tiny-moe", tensor_parallel_size=2, **TINY))


# ---- synthetic expert weights ------------------------------------------------------------


def test_synthetic_expert_weights_is_validated():
    with pytest.raises(ValueError, match="synthetic_expert_weights must be one of"):
        EngineConfig("synthetic:tiny-moe", synthetic_expert_weights="int4")
    with pytest.raises(ValueError, match="synthetic_expert_weights applies to synthetic"):
        EngineConfig("/some/checkpoint", synthetic_expert_weights="fp8")
    assert EngineConfig("synthetic:tiny-moe").synthetic_overrides() == {}
    config = EngineConfig("synthetic:tiny-moe", synthetic_num_layers=1,
                          synthetic_expert_weights="fp8")
    assert config.synthetic_overrides() == {"num_layers": 1, "expert_weights": "fp8"}


@pytest.mark.parametrize("preset,weights,stored", [
    ("tiny-moe", None, "w13"), ("tiny-moe", "fp8", "w13_scale_inv"),
    ("tiny-moe", "mxfp4", "w13_blocks"), ("tiny-gpt-oss", None, "w13_blocks"),
    ("tiny-gpt-oss", "dense", "w13"),
])
def test_synthetic_expert_weights_reach_the_model(preset, weights, stored):
    llm = LLM(f"synthetic:{preset}", device="cpu", dtype="float32",
              pool_memory_bytes=16 << 20, synthetic_expert_weights=weights)
    experts = llm.llm_engine.model.model.layers[0].mlp.experts
    assert hasattr(experts, stored)
    default = "mxfp4" if preset == "tiny-gpt-oss" else "dense"
    assert llm.llm_engine.model.config.expert_format == (weights or default)
    tokens = _tokens(llm)
    assert all(len(t) == 6 for t in tokens)
    llm.shutdown()


def test_expert_formats_agree_on_the_same_weights():
    """Dense and quantized synthetic models differ in weights, but each must generate from its
    own: FP8 and MXFP4 tiny-moe engines run and stay finite."""
    for weights in ("fp8", "mxfp4"):
        engine = LLMEngine(EngineConfig("synthetic:tiny-moe", synthetic_expert_weights=weights,
                                        **TINY))
        assert _engine_tokens(engine, max_tokens=3)
        w13 = engine.model.model.layers[0].mlp.experts.stacks()[0]
        assert torch.isfinite(w13.scales.float()).all()
        engine.shutdown()
