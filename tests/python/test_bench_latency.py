"""`moelora bench latency` on the tiny synthetic model (CPU): every field of its JSON lines, strict
JSON, the table, the plot; and the probes it is built on (step timing, routing capture) against
an engine run directly."""

from __future__ import annotations

import json

import pytest
import torch
from moelora import LoRARequest, SamplingParams
from moelora.bench.step_probe import RoutingCapture, StepTimer, steady_decode_steps
from moelora.bench.synthetic_adapters import write_adapters
from moelora.bench.weight_bytes import WeightLayout, decode_step_bytes
from moelora.cli import main
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine

E2E_FIELDS = ("model", "device_name", "dtype", "weights", "num_layers", "num_seqs",
              "num_adapters", "step_wall_ms", "step_gpu_ms", "kernels_per_step", "roofline_ms",
              "roofline_ratio", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
              "tpot_p50_ms", "tpot_p99_ms", "ratio_to_no_adapters")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a shared 2-core CI machine runs these steps 50x slower with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_latency_records_every_field(tmp_path, capsys):
    out = tmp_path / "e2e.jsonl"
    argv = ["bench", "latency", "--device", "cpu", "--num-seqs", "1", "3",
            "--num-adapters", "2", "--input-len", "6", "--output-len", "5", "--rounds", "2",
            "--copy-rate", "1e11", "--adapter-dir", str(tmp_path / "adapters"),
            "--out", str(out)]
    pytest.importorskip("matplotlib")
    argv += ["--plot", str(tmp_path / "latency.png")]
    assert main(argv) == 0
    records = [_strict(line) for line in out.read_text().splitlines()]
    assert [(r["num_seqs"], r["num_adapters"]) for r in records] == [(1, 0), (1, 2), (3, 0),
                                                                      (3, 2)]
    for record in records:
        for field in E2E_FIELDS:
            assert field in record, field
        assert record["model"] == "synthetic:tiny-moe" and record["device_name"] == "cpu"
        assert record["weights"] == "fp32" and record["num_layers"] == 4
        assert record["failed"] == 0 and record["steady_steps"] >= 3
        assert record["step_wall_ms"] > 0 and record["output_tokens_per_s"] > 0
        assert record["step_gpu_ms"] is None and record["kernels_per_step"] is None  # no GPU
        assert len(record["rounds_output_tokens_per_s"]) == 2
        assert record["routing_counted"] is True
        assert 1 <= record["experts_per_layer_mean"] <= min(8, 2 * record["num_seqs"])
        assert record["roofline_ms"] == pytest.approx(
            1e3 * record["roofline_bytes"]["total"] / 1e11)
        assert record["roofline_ratio"] == pytest.approx(record["step_wall_ms"] /
                                                         record["roofline_ms"])
        assert (record["roofline_bytes"]["lora"] > 0) == (record["num_adapters"] > 0)
    base = [r for r in records if r["num_adapters"] == 0]
    assert all(r["ratio_to_no_adapters"] == 1.0 for r in base)
    with_adapters = records[3]
    assert with_adapters["adapters_in_batch"] == 2
    assert with_adapters["ratio_to_no_adapters"] == pytest.approx(
        with_adapters["output_tokens_per_s"] / records[2]["output_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "wall ms" in printed and "roofline ms" in printed and "vs none" in printed
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_latency_refuses_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match="--num-adapters must be >= 0"):
        main(["bench", "latency", "--device", "cpu", "--num-adapters", "-1", "--out", "-"])
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--device", "cpu", "--num-layers", "0", "--out", "-"])


@pytest.fixture(scope="module")
def engine():
    engine = LLMEngine(EngineConfig("synthetic:tiny-moe", device="cpu", enable_lora=True,
                                    max_loras=2, load_progress=False))
    yield engine
    engine.stop()


def test_step_timer_sees_prefill_and_steady_decode(engine):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"timer{i}", [1 + i, 2, 3, 4, 5], params)
    with StepTimer(engine) as timer:
        while engine.has_unfinished_requests():
            timer.step()
    steps = timer.finish()
    assert not set(StepTimer._WRAPPED) & set(vars(engine.runner))  # the wrappers are gone
    assert not steps[0].is_decode and steps[0].num_tokens == 15  # the prefill of 3 x 5
    steady = steady_decode_steps(steps, 3)
    assert len(steady) == 3 and all(s.num_tokens == 3 and s.wall_s > 0 for s in steady)


def test_routing_capture_counts_experts_and_pairs(engine, tmp_path):
    sites = engine.model.lora_sites()
    paths = write_adapters(str(tmp_path), 2, sites, 8)
    loras = [LoRARequest(f"route{i}", 100 + i, path) for i, path in enumerate(paths)]
    for lora in loras:
        engine.adapters.preload(lora)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(4):  # two sequences of each adapter
        engine.add_request(f"route{i}", [7 + i, 8, 9], params, loras[i % 2])
    with StepTimer(engine) as timer:
        for _ in range(16):  # bounded: a timer that sees no step must fail, not spin
            if steady_decode_steps(timer.steps, 4):
                break
            timer.step()
    assert steady_decode_steps(timer.steps, 4), timer.steps
    capture = RoutingCapture(engine)
    routing = capture.step()
    config = engine.model.config
    assert routing.counted and len(routing.experts_per_layer) == config.num_layers
    for layer, ids in capture.ids.items():
        assert ids.shape == (4, config.top_k)
        assert routing.experts_per_layer[layer] == len(set(ids.flatten().tolist()))
        slots = capture.token_slot.tolist()
        pairs = {(slots[t], e) for t in range(4) for e in ids[t].tolist()}
        assert routing.pairs_per_layer[layer] == len(pairs)
    assert routing.adapters_per_layer == [2] * config.num_layers
    while engine.has_unfinished_requests():
        engine.step()
    step = decode_step_bytes(config, WeightLayout.of("bf16", torch.float32), [4] * 4,
                             routing.experts_per_layer, 4, lora_rank=8,
                             adapters_per_layer=routing.adapters_per_layer,
                             pairs_per_layer=routing.pairs_per_layer)
    assert step.experts > 0 and step.lora > 0


@pytest.mark.gpu
def test_gpu_latency_times_the_gpu_and_counts_kernels(tmp_path):
    """On a GPU (decode graphs on): GPU time within the wall time, kernels counted from the
    replayed graph, the roofline from the card's copy rate."""
    out = tmp_path / "e2e.jsonl"
    assert main(["bench", "latency", "--device", "cuda", "--dtype", "bfloat16",
                 "--num-seqs", "1", "8", "--num-adapters", "0", "2", "--input-len", "16",
                 "--output-len", "16", "--rounds", "2", "--adapter-dir", str(tmp_path / "a"),
                 "--out", str(out)]) == 0
    records = [_strict(line) for line in out.read_text().splitlines()]
    for record in records:
        assert record["decode_graphs"] is True
        assert 0 < record["step_gpu_ms"] <= record["step_wall_ms"] * 1.05
        assert record["kernels_per_step"] > record["num_layers"]
        assert record["kernel_count_mode"] in ("decode graph replay",
                                               "eager step (the replay showed no kernels)")
        if "H100" in record["device_name"] or "H200" in record["device_name"]:
            assert record["roofline_ms"] > 0 and record["roofline_ratio"] > 1
