"""Which expert GEMM form each MoE step shape should run: one GPU run (about 5 minutes on an H100)
that checks the kernels, localizes any numerical gap, times every variant side by side and
proposes the rows of moelora.ops.moe.GEMM_PLAN (the table to edit).

    python3 bench/studies/moe_decode_ab.py --out /tmp/moe-ab [--ncu] [--skip-tests]

Needs a CUDA build of moelora importable by this Python (pip install -e ., or tools/dev_build.sh
with MOELORA_CUDA=ON and PYTHONPATH=python). Stages, each a subprocess with a time limit, so a
failing or hanging one is reported and the next still runs; full logs go to --out:
  1. tests: the MoE GPU tests (tests/python/test_gpu_moe_*.py);
  2. parity: moelora.bench.moe_parity for MXFP4, FP8 and dense experts (per layer and op errors,
     routing near-ties);
  3. ab: moelora.bench.moe over gpt-oss-20b (mxfp4, bf16) and qwen3-30b-a3b (bf16, fp8) at
     T = 1, 4, 16, 64, 512, 2048 for every variant (--variants), ratios to "tiles" (the tiled
     kernel with the old rows-per-block rule);
  4. ncu (with --ncu, when `ncu` is on PATH): SpeedOfLight and MemoryWorkloadAnalysis of the
     expert GEMM kernels at T = 1 and 16, gpt-oss-20b MXFP4, stream and tiles.
Printed last: the A/B table (layer us, fraction of the layer roofline, the GEMMs' fraction of
their weight-bytes roofline, speed-up over tiles) and the fastest variant per (weights, rows per
expert) as GEMM_PLAN rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["tiles", "plan", "stream:8", "stream:16", "stream:16:8", "stream:16:12",
            "tensor_core:32", "tensor_core:64", "grouped_mm"]
TOKENS = [1, 4, 16, 64, 512, 2048]
EXPERTS = {"gpt-oss-20b": (32, 4), "qwen3-30b-a3b": (128, 8)}  # experts, top_k


def stage(name: str, command: list[str], out: Path, limit_s: int) -> tuple[int | str, str]:
    """Runs one stage; returns (exit status or "timeout", its output)."""
    log = out / f"{name}.log"
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.time()
    try:
        done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=limit_s)
        status, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        text = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else \
            (expired.stdout or "")
    log.write_text(text)
    print(f"   {name}: {status} after {time.time() - start:.0f} s, log {log}", flush=True)
    return status, text


def best_rows(records: list[dict]) -> list[str]:
    """The fastest strict variant per (weights, rows per touched expert), as GEMM_PLAN would
    hold it."""
    best: dict[tuple[str, float], tuple[float, str, str]] = {}
    for r in records:
        if "layer_us" not in r or r["variant"] == "plan":
            continue
        experts, top_k = EXPERTS.get(r["preset"], (0, 0))
        if not experts:
            continue
        pairs = r["tokens"] * top_k
        per_expert = round(pairs / min(experts, pairs), 2)
        key = ("dense" if r["weights"] == "bf16" else r["weights"], per_expert)
        choice = r["plan"] if r["variant"] != "tiles" else f"{r['plan']} (tiles)"
        if key not in best or r["layer_us"] < best[key][0]:
            best[key] = (r["layer_us"], choice, r["preset"])
    lines = [f"{'weights':<7} {'rows/expert':>11}  {'fastest':<24} {'layer us':>9}  preset"]
    for (fmt, per_expert), (us, choice, preset) in sorted(best.items()):
        lines.append(f"{fmt:<7} {per_expert:>11g}  {choice:<24} {us:>9.1f}  {preset}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/moe-ab", help="directory for the logs")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--ncu", action="store_true", help="add the Nsight Compute pass")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    statuses = {}
    if not args.skip_tests:
        tests = sorted(str(p.relative_to(ROOT)) for p in
                       (ROOT / "tests/python").glob("test_gpu_moe_*.py"))
        statuses["tests"], text = stage("tests", [python, "-m", "pytest", *tests, "-q",
                                                  "-p", "no:cacheprovider"], out, 150)
        print("   " + (text.strip().splitlines() or ["(no output)"])[-1])
    parity = []
    for fmt in ("mxfp4", "fp8", "dense"):
        status, text = stage(f"parity-{fmt}", [python, "-m", "moelora.bench.moe_parity",
                                               "--expert-weights", fmt], out, 60)
        statuses[f"parity-{fmt}"] = status
        parity.append(text)
    ab_json = out / "moe-ab.jsonl"
    ab_json.unlink(missing_ok=True)
    statuses["ab"], _ = stage("ab", [
        python, "-m", "moelora.bench.moe", "--presets", "gpt-oss-20b", "qwen3-30b-a3b",
        "--tokens", *map(str, args.tokens), "--variants", *args.variants, "--iters",
        str(args.iters), "--settle-s", "0", "--table", "--out", str(ab_json)], out, 240)
    if args.ncu:
        if shutil.which("ncu"):
            statuses["ncu"], _ = stage("ncu", [
                "ncu", "--clock-control", "none", "--section", "SpeedOfLight", "--section",
                "MemoryWorkloadAnalysis", "-k", "regex:moe_(gemm|stream)_kernel", "-c", "24",
                python, "-m", "moelora.bench.moe", "--presets", "gpt-oss-20b", "--weights",
                "mxfp4", "--tokens", "1", "16", "--variants", "stream:8", "tiles", "--iters",
                "2", "--no-torch", "--settle-s", "0"], out, 180)
        else:
            statuses["ncu"] = "skipped: no ncu on PATH"

    print("\n== parity: final logits against float32, free, then on the GPU's routing")
    for text in parity:
        for line in text.strip().splitlines():
            if line.startswith(("# tiny", "# routing")) or line.split()[1:2] == ["logits"]:
                print(line)
    records = []
    if ab_json.exists():
        records = [json.loads(line) for line in ab_json.read_text().splitlines() if line]
    print("\n== fastest variant per (weights, rows per touched expert): GEMM_PLAN rows")
    print("\n".join(best_rows(records)))
    print("\n== stages: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    from moelora.bench.moe import format_table

    print("\n== A/B (us, layer roofline fraction, GEMM weight-bytes fraction, x over tiles)")
    print(format_table(records) if records else "no A/B records: see " + str(out / "ab.log"))


if __name__ == "__main__":
    main()
