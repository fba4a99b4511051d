"""`moelora bench adapters`: how fast the engine loads adapters, against a plain parallel read of
the same files in the same run.

--num-adapters random rank --rank adapters (attention and every expert) are written once for
the model's shapes (the model itself is never built: only its config). Then, --repeats times,
interleaved:
  plain read   the adapters' files read by --threads threads in 64 MiB chunks into per-thread
               buffers (os.preadv): the storage's rate, the bar the engine is held to;
  engine, cold the engine's load path: register every adapter, prefetch them all and wait until
               all are resident (AdapterManager and the native adapter cache, disk -> host ->
               device; a device copy streams beside its read where the host buffer allows),
               timed end to end;
  engine, split registered again from cold, then the host tier filled first (load_host on
               --threads threads: disk -> host), then prefetch + wait (host -> device).
Before each read the files' pages are dropped from the page cache (fsync, then
posix_fadvise DONTNEED, which needs no privileges) unless --warm-cache is given.

Prints a table and appends one JSON line with GB/s of file bytes for each path, host-to-device
GB/s of packed bytes (null without a GPU: the "device" is then host memory), and each engine
rate's ratio to the plain read (issue 21's bar: disk-to-host >= 0.8x).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from moelora.bench import flags
from moelora.bench.records import append_record, dumps, format_table, median, ratio

CHUNK_BYTES = 64 << 20
GB = 1e9
TABLE = [("path", "path"), ("gbps", "GB/s"), ("ratio_to_plain", "vs plain read"),
         ("seconds", "seconds")]


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:tiny-moe",
                        help="synthetic:<preset> or a model directory (its config only)")
    parser.add_argument("--num-layers", type=flags.positive_int, default=None,
                        help="synthetic models: adapters for this many layers")
    parser.add_argument("--num-adapters", type=flags.positive_int, default=8,
                        help="adapters written and loaded")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--threads", type=flags.positive_int, default=4,
                        help="reader threads of the plain read and the engine's load threads")
    parser.add_argument("--repeats", type=flags.positive_int, default=2,
                        help="interleaved rounds of every path (medians reported)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the files in the page cache (measures memory, not storage)")
    flags.add_engine_placement_arguments(parser, seed_help="adapter weights")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    return parser


def drop_page_cache(paths: list[str]) -> bool:
    """Evicts the files' pages from the page cache; False where the OS offers no way."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def plain_parallel_read(paths: list[str], threads: int) -> float:
    """Seconds to read every byte of `paths` with `threads` threads, CHUNK_BYTES at a time."""
    chunks = [(path, offset, min(CHUNK_BYTES, size - offset))
              for path in paths for size in [os.path.getsize(path)]
              for offset in range(0, size, CHUNK_BYTES)]
    buffers = [bytearray(CHUNK_BYTES) for _ in range(threads)]
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    slots = list(range(threads))

    def read(chunk) -> int:
        path, offset, length = chunk
        slot = slots.pop()
        try:
            view = memoryview(buffers[slot])[:length]
            done = 0
            while done < length:
                got = os.preadv(fds[path], [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"{path}: ended {length - done} bytes early")
                done += got
            return done
        finally:
            slots.append(slot)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, chunks))
        seconds = time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
    expected = sum(os.path.getsize(p) for p in paths)
    if total != expected:
        raise OSError(f"read {total} bytes of {expected}")
    return seconds


def run_from_args(args) -> int:
    from moelora.bench.synthetic_adapters import adapter_directory

    with adapter_directory(args.adapter_dir, "moelora-bench-load-") as adapter_dir:
        return _run(args, adapter_dir)


def _run(args, adapter_dir: str) -> int:
    from moelora.bench.adapter_loads import AdapterLoads

    loads = AdapterLoads(args, adapter_dir)
    files = loads.files
    file_bytes = sum(os.path.getsize(p) for p in files)
    rounds = []
    try:
        for _ in range(args.repeats):
            dropped = not args.warm_cache and drop_page_cache(files)
            plain = plain_parallel_read(files, args.threads)
            if not args.warm_cache:
                drop_page_cache(files)
            cold, streamed = loads.cold()
            if not args.warm_cache:
                drop_page_cache(files)
            to_host, to_device, host_bytes = loads.split()
            rounds.append({"plain_s": plain, "engine_cold_s": cold, "streamed_loads": streamed,
                           "disk_to_host_s": to_host,
                           "host_to_device_s": to_device, "host_bytes": host_bytes,
                           "page_cache_dropped": dropped})
    finally:
        loads.close()
    seconds = {key: median([r[key] for r in rounds]) for key in
               ("plain_s", "engine_cold_s", "disk_to_host_s", "host_to_device_s")}
    plain_gbps = file_bytes / seconds["plain_s"] / GB
    host_bytes = rounds[-1]["host_bytes"]
    on_gpu = loads.device.type == "cuda"
    record = {
        "bench": "adapters", "model": args.model, **loads.fields,
        "num_layers": loads.num_layers, "num_adapters": args.num_adapters, "rank": args.rank,
        "threads": args.threads, "repeats": args.repeats, "file_bytes": file_bytes,
        "host_bytes": host_bytes, "page_cache": "kept warm" if args.warm_cache else (
            "dropped (fsync + posix_fadvise DONTNEED)" if rounds[-1]["page_cache_dropped"]
            else "not dropped (no posix_fadvise)"),
        "plain_read_gbps": plain_gbps,
        "engine_disk_to_device_gbps": file_bytes / seconds["engine_cold_s"] / GB,
        "engine_disk_to_host_gbps": file_bytes / seconds["disk_to_host_s"] / GB,
        "engine_host_to_device_gbps": (host_bytes / seconds["host_to_device_s"] / GB
                                       if on_gpu else None),
        "host_to_pool_gbps": host_bytes / seconds["host_to_device_s"] / GB,
        **seconds, "rounds": rounds,
    }
    record["disk_to_device_ratio_to_plain"] = ratio(record["engine_disk_to_device_gbps"],
                                                    plain_gbps)
    record["disk_to_host_ratio_to_plain"] = ratio(record["engine_disk_to_host_gbps"], plain_gbps)
    rows = [{"path": "plain parallel read", "gbps": plain_gbps, "ratio_to_plain": 1.0,
             "seconds": seconds["plain_s"]},
            {"path": "engine: disk -> device", "gbps": record["engine_disk_to_device_gbps"],
             "ratio_to_plain": record["disk_to_device_ratio_to_plain"],
             "seconds": seconds["engine_cold_s"]},
            {"path": "engine: disk -> host", "gbps": record["engine_disk_to_host_gbps"],
             "ratio_to_plain": record["disk_to_host_ratio_to_plain"],
             "seconds": seconds["disk_to_host_s"]},
            {"path": "engine: host -> " + ("device" if on_gpu else "pool (host memory)"),
             "gbps": record["host_to_pool_gbps"], "seconds": seconds["host_to_device_s"]}]
    print(f"{args.num_adapters} adapters of {args.model} ({loads.num_layers} layers, rank "
          f"{args.rank}): {file_bytes / GB:.2f} GB of files, {host_bytes / GB:.2f} GB packed; "
          f"page cache {record['page_cache']}; medians of {args.repeats}; "
          f"{rounds[-1]['streamed_loads']} of {args.num_adapters} cold loads streamed")
    print(format_table(TABLE, rows))
    print(dumps(record))
    append_record(record, args.out)
    return 0


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench adapters"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
