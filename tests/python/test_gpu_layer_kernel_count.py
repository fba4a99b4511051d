"""Kernels per decoder layer of one decode step, counted with torch.profiler on a GPU.

One eager decode step of a synthetic model (real shapes, bf16) is profiled with 1 and with 2
layers; the difference is one layer's kernels, by name. The attention part alone is counted the
same way with every layer's MLP replaced by a no-op. The test checks the attention part's own
kernels (two norms with the residual add fused in, one rope + KV write) and prints the whole
table; run as a script for the lead's measurement of the 15-kernels-per-layer goal:

    python tests/python/test_gpu_layer_kernel_count.py --preset gpt-oss-20b --seqs 16
    python tests/python/test_gpu_layer_kernel_count.py --preset qwen3-30b-a3b --seqs 16
"""

from __future__ import annotations

import argparse
import gc
from collections import Counter

import pytest
import torch
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from moelora.engine.sampling_params import SamplingParams
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

pytestmark = pytest.mark.gpu


class _NoMlp(nn.Module):
    """Stands in for a layer's MLP: returns its input, launches nothing."""

    def forward(self, x, ctx):
        return x


def decode_step_kernels(preset: str, num_layers: int, num_seqs: int,
                        attention_only: bool) -> tuple[Counter, Counter]:
    """(kernel names, memcpy/memset names) of one eager decode step, with their counts."""
    engine = LLMEngine(EngineConfig(f"synthetic:{preset}", dtype="bfloat16", device="cuda",
                                    synthetic_num_layers=num_layers, decode_graphs=False,
                                    pool_memory_bytes=1 << 30, max_num_seqs=max(num_seqs, 1),
                                    load_progress=False))
    try:
        if attention_only:
            for layer in engine.model.model.layers:
                layer.mlp = _NoMlp()
        params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
        for i in range(num_seqs):
            engine.add_request(str(i), [1 + i, 2, 3, 4, 5, 6, 7, 8], params)
        engine.step()  # prefill
        engine.step()  # one decode step to warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        kernels, copies = Counter(), Counter()
        for event in prof.events():
            if event.device_type != DeviceType.CUDA:
                continue
            is_copy = event.name.startswith(("Memcpy", "Memset"))
            (copies if is_copy else kernels)[event.name] += 1
        return kernels, copies
    finally:
        engine.stop()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def per_layer(preset: str, num_seqs: int, attention_only: bool) -> dict[str, int]:
    """Kernels one more layer adds to a decode step, by name (difference of 2 and 1 layers)."""
    one, _ = decode_step_kernels(preset, 1, num_seqs, attention_only)
    two, _ = decode_step_kernels(preset, 2, num_seqs, attention_only)
    names = set(one) | set(two)
    diff = {name: two[name] - one[name] for name in names}
    return {name: count for name, count in sorted(diff.items()) if count}


def print_table(title: str, counts: dict[str, int]) -> None:
    print(f"\n{title}: {sum(counts.values())} kernels per layer")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"  {count:3d}  {name[:150]}")


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("num_seqs", [1, 16])
def test_gpu_attention_part_of_a_decode_layer(preset, num_seqs):
    counts = per_layer(preset, num_seqs, attention_only=True)
    print_table(f"{preset}, {num_seqs} sequences, attention part", counts)

    def named(fragment):
        return sum(c for name, c in counts.items() if fragment in name)

    assert named("rms_norm_kernel") == 2  # input norm (+ add) and post-attention norm (+ add)
    assert named("rope_kv_kernel") == 1  # q/k norm (qwen3), rope, K and V into the pages
    # norm, QKV GEMM, rope + KV write, attention, o_proj GEMM, add + norm; a bias may cost a
    # GEMM one extra kernel at a single row
    assert sum(counts.values()) <= 8, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--seqs", type=int, default=16)
    args = parser.parse_args()
    print_table(f"{args.preset}, {args.seqs} sequences, attention part",
                per_layer(args.preset, args.seqs, attention_only=True))
    print_table(f"{args.preset}, {args.seqs} sequences, whole layer",
                per_layer(args.preset, args.seqs, attention_only=False))


if __name__ == "__main__":
    main()
