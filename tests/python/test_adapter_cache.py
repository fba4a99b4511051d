"""The adapter cache through Python: real safetensors files written by the `safetensors`
package from torch tensors, rows read back through the row table and compared with an
independent torch reference."""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch
from moelora import _C
from safetensors.torch import save_file

SITES = [("q_proj", 2, 1, 45, 19), ("experts.w13", 2, 4, 45, 26)]
PAGE_BYTES = 1024
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_sites():
    return [_C.LoraSite(name=n, num_layers=l, num_experts=e, in_dim=i, out_dim=o)
            for n, l, e, i, o in SITES]


def write_adapter(tmp_path, name, ranks, seed, src_dtype, scale, poison=False,
                  one_source_per_tensor=False):
    """PEFT layout: A [r, in], B [out, r]; experts fused [E, r, in] / [E, out, r]. The views
    are one source per expert, or with `one_source_per_tensor` one source for all of a
    tensor's experts (LoraMatrixSource.experts)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, matrices, reference = {}, [], {}
    for s, (site_name, layers, experts, in_dim, out_dim) in enumerate(SITES):
        for layer in range(layers):
            r = ranks[s][layer]
            if r == 0:
                continue
            a = torch.randn(experts, r, in_dim, generator=gen).to(src_dtype)
            b = torch.randn(experts, out_dim, r, generator=gen).to(src_dtype)
            if poison:
                a[0, 0, 3] = float("nan")
            tensors[f"{site_name}.{layer}.A"] = a.contiguous()
            tensors[f"{site_name}.{layer}.B"] = b.contiguous()
            if one_source_per_tensor:
                matrices.append(_C.LoraMatrixSource(
                    site=s, layer=layer, expert=0, is_b=False, tensor=f"{site_name}.{layer}.A",
                    rows=r, cols=in_dim, row_stride=in_dim, col_stride=1, scale=scale,
                    experts=experts, expert_stride=r * in_dim))
                matrices.append(_C.LoraMatrixSource(
                    site=s, layer=layer, expert=0, is_b=True, tensor=f"{site_name}.{layer}.B",
                    rows=r, cols=out_dim, row_stride=1, col_stride=r, scale=scale,
                    experts=experts, expert_stride=out_dim * r))
            for e in range(experts):
                reference[(s, layer, e, False)] = a[e].float()
                reference[(s, layer, e, True)] = b[e].float().t() * scale
                if one_source_per_tensor:
                    continue
                matrices.append(_C.LoraMatrixSource(
                    site=s, layer=layer, expert=e, is_b=False, tensor=f"{site_name}.{layer}.A",
                    offset=e * r * in_dim, rows=r, cols=in_dim, row_stride=in_dim, col_stride=1,
                    scale=scale))
                matrices.append(_C.LoraMatrixSource(
                    site=s, layer=layer, expert=e, is_b=True, tensor=f"{site_name}.{layer}.B",
                    offset=e * out_dim * r, rows=r, cols=out_dim, row_stride=1, col_stride=r,
                    scale=scale))
    path = os.path.join(tmp_path, f"{name}.safetensors")
    save_file(tensors, path)
    spec = _C.AdapterSpec(name=name, files=[path], ranks=ranks, matrices=matrices)
    return spec, reference


def read_rows(cache, site, layer, slot, expert, is_b, rank, dim, dtype):
    view = cache.site_view(site, layer)
    rows = []
    for r in range(rank):
        index = slot * view.slot_stride + (expert * 2 + int(is_b)) * view.max_rank + r
        offset = ctypes.c_int64.from_address(view.row_offsets + 8 * index).value
        nbytes = dim * torch.tensor([], dtype=dtype).element_size()
        raw = ctypes.string_at(view.arena + offset, nbytes)
        rows.append(torch.frombuffer(bytearray(raw), dtype=dtype).float())
    got_rank = ctypes.c_int32.from_address(view.ranks + 4 * slot * view.rank_slot_stride).value
    return torch.stack(rows), got_rank


def check_adapter(cache, adapter_id, spec, reference, dtype_name):
    dtype = TORCH_DTYPES[dtype_name]
    slot = cache.acquire(adapter_id)
    try:
        for (s, layer, e, is_b), expected in reference.items():
            dim = SITES[s][4] if is_b else SITES[s][3]
            rank = spec.ranks[s][layer]
            got, got_rank = read_rows(cache, s, layer, slot, e, is_b, rank, dim, dtype)
            assert got_rank == rank
            torch.testing.assert_close(got, expected.to(dtype).float(), rtol=0, atol=0)
    finally:
        cache.release(adapter_id)


def make_cache(pages=1024, max_loras=3, dtype="bfloat16", **kwargs):
    pool = _C.PagePool(pages * PAGE_BYTES, PAGE_BYTES)
    copies = _C.make_cpu_copy_engine()
    cache = _C.AdapterCache(pool, copies, make_sites(), max_loras=max_loras, max_lora_rank=8,
                            dtype=dtype, **kwargs)
    return pool, cache


def test_safetensors_headers(tmp_path):
    path = os.path.join(tmp_path, "t.safetensors")
    save_file({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "y": torch.ones(5, dtype=torch.bfloat16)}, path)
    f = _C.SafetensorsFile.open(path)
    infos = {t["name"]: t for t in f.tensors()}
    assert infos["x"]["shape"] == [2, 3] and infos["x"]["byte_length"] == 24
    assert infos["y"]["dtype"] == "bfloat16"
    assert "x" in f and "z" not in f
    raw = f.read_tensor("x")
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(_C.NotFound):
        f.tensor("z")
    with pytest.raises(_C.IoError):
        _C.SafetensorsFile.open(os.path.join(tmp_path, "missing.safetensors"))
    with open(path, "r+b") as fh:
        fh.seek(12)
        fh.write(b"\x00garbage")
    with pytest.raises(_C.InvalidArgument):
        _C.SafetensorsFile.open(path)


def test_sources_from_tuples_equal_the_keyword_constructor():
    fields = ("site", "layer", "expert", "is_b", "file", "tensor", "offset", "rows", "cols",
              "row_stride", "col_stride", "scale", "experts", "expert_stride")
    values = [(1, 2, 3, True, 1, "w.lora_B", 40, 8, 96, 1, 8, 0.5, 4, 768),
              (0, 0, 0, False, 0, "a", 0, 4, 16, 16, 1, 2.0, 1, 0)]
    built = _C.lora_matrix_sources(values)
    for source, row in zip(built, values, strict=True):
        keyword = _C.LoraMatrixSource(**dict(zip(fields, row)))
        assert [getattr(source, f) for f in fields] == [getattr(keyword, f) for f in fields]
    with pytest.raises(TypeError):
        _C.lora_matrix_sources([(1, 2, 3)])


@pytest.mark.parametrize("model_dtype", ["bfloat16", "float32", "float16"])
def test_mixed_ranks_and_sources_load_exactly(tmp_path, model_dtype):
    pool, cache = make_cache(dtype=model_dtype)
    adapters = [
        write_adapter(tmp_path, "a", [[8, 1], [3, 0]], 1, torch.float32, 0.5),
        write_adapter(tmp_path, "b", [[0, 2], [7, 5]], 2, torch.bfloat16, 2.0),
        write_adapter(tmp_path, "c", [[1, 1], [1, 1]], 3, torch.float16, -0.75),
    ]
    ids = [cache.register_adapter(spec) for spec, _ in adapters]
    assert all(cache.residency(i) == _C.Residency.DISK for i in ids)
    for i in ids:
        cache.prefetch(i)
    for i, (spec, reference) in zip(ids, adapters):
        cache.wait(i)
        assert cache.residency(i) == _C.Residency.DEVICE
        check_adapter(cache, i, spec, reference, model_dtype)
    stats = cache.stats()
    assert stats["on_device"] == 3 and stats["device_loads"] == 3 and stats["bytes_loaded"] > 0
    pool.check_invariants()


def test_one_source_for_all_experts_loads_exactly(tmp_path):
    pool, cache = make_cache()
    spec, reference = write_adapter(tmp_path, "fused", [[2, 3], [5, 1]], 4, torch.bfloat16,
                                    1.5, one_source_per_tensor=True)
    assert len(spec.matrices) == 2 * 4  # a source per (site, layer, A or B)
    adapter_id = cache.register_adapter(spec)
    cache.prefetch(adapter_id)
    cache.wait(adapter_id)
    check_adapter(cache, adapter_id, spec, reference, "bfloat16")
    pool.check_invariants()


@pytest.mark.parametrize("first, experts", [(0, 5), (3, 2), (-1, 2), (0, 0)])
def test_a_source_past_its_sites_experts_is_refused(tmp_path, first, experts):
    _pool, cache = make_cache()
    spec, _ = write_adapter(tmp_path, "wide", [[2, 2], [2, 2]], 5, torch.bfloat16, 1.0,
                            one_source_per_tensor=True)
    matrices = list(spec.matrices)
    matrices[-1].expert, matrices[-1].experts = first, experts  # experts.w13 has 4
    spec.matrices = matrices
    with pytest.raises(_C.AdapterError, match=r"adapter 'wide'.*expert.*the site has 4"):
        cache.register_adapter(spec)
    assert cache.stats()["registered"] == 0


def test_corrupt_files_fail_only_their_adapter(tmp_path):
    _pool, cache = make_cache(max_loras=4)
    good = [write_adapter(tmp_path, f"good{i}", [[4, 4], [2, 6]], 10 + i, torch.bfloat16, 1.0)
            for i in range(3)]
    nan_spec, _ = write_adapter(tmp_path, "nan", [[2, 2], [2, 2]], 20, torch.float32, 1.0,
                                poison=True)
    cut_spec, _ = write_adapter(tmp_path, "cut", [[2, 2], [2, 2]], 21, torch.float32, 1.0)
    bad_header_spec, _ = write_adapter(tmp_path, "bad_header", [[2, 2], [2, 2]], 22,
                                       torch.float32, 1.0)
    with open(bad_header_spec.files[0], "r+b") as fh:
        fh.seek(9)
        fh.write(b"}}}}")
    with pytest.raises(_C.AdapterError, match="bad_header"):
        cache.register_adapter(bad_header_spec)

    good_ids = [cache.register_adapter(spec) for spec, _ in good]
    nan_id = cache.register_adapter(nan_spec)
    cut_id = cache.register_adapter(cut_spec)
    os.truncate(cut_spec.files[0], 100)
    for i in [nan_id, cut_id, *good_ids]:
        cache.prefetch(i)
    with pytest.raises(_C.AdapterError, match="nan"):
        cache.wait(nan_id)
    with pytest.raises(_C.AdapterError, match="cut"):
        cache.wait(cut_id)
    assert cache.residency(nan_id) == _C.Residency.FAILED
    assert "holds NaN" in cache.error_message(nan_id)
    for i, (spec, reference) in zip(good_ids, good):
        cache.wait(i)
        check_adapter(cache, i, spec, reference, "bfloat16")
    assert cache.stats()["failed"] == 2


def test_lru_pinning_and_kv_eviction(tmp_path):
    pool, cache = make_cache(pages=64, max_loras=2, max_cpu_loras=2)
    adapters = [write_adapter(tmp_path, f"lru{i}", [[3, 3], [1, 2]], 30 + i, torch.float32, 1.0)
                for i in range(3)]
    ids = [cache.register_adapter(spec) for spec, _ in adapters]
    cache.wait(ids[0])
    cache.wait(ids[1])
    cache.acquire(ids[0])  # pinned: the other one must make room
    slot = cache.wait(ids[2])
    assert cache.slot_of(ids[1]) == -1 and cache.slot_of(ids[2]) == slot
    assert cache.residency(ids[0]) == _C.Residency.DEVICE
    with pytest.raises(_C.InvalidArgument):
        cache.unregister(ids[0])
    assert cache.stats()["host_copies"] <= 2
    # KV takes every page the pinned adapter does not hold: the idle one is evicted.
    kv_pages = pool.num_pages - cache.num_pages(ids[0])
    outcome = pool.try_allocate("kv", 1, kv_pages, evict=True)
    assert outcome.ok
    assert cache.slot_of(ids[2]) == -1
    assert cache.residency(ids[0]) == _C.Residency.DEVICE
    cache.release(ids[0])
    cache.unregister("lru0")
    with pytest.raises(_C.NotFound):
        cache.id_of("lru0")
    pool.check_invariants()


def test_cache_keeps_pool_and_engine_alive(tmp_path):
    pool, cache = make_cache()
    spec, reference = write_adapter(tmp_path, "alive", [[2, 0], [0, 3]], 40, torch.float32, 3.0)
    del pool
    gc.collect()
    adapter_id = cache.register_adapter(spec)
    cache.wait(adapter_id)
    check_adapter(cache, adapter_id, spec, reference, "bfloat16")


def test_pack_threads_are_validated():
    with pytest.raises(_C.InvalidArgument, match="pack_threads"):
        make_cache(pack_threads=-1)
    with pytest.raises(_C.InvalidArgument, match="pack_threads"):
        make_cache(pack_threads=65)
    make_cache(pack_threads=4)  # accepted
    from moelora.engine.config import EngineConfig
    with pytest.raises(ValueError, match="adapter_pack_threads"):
        EngineConfig("synthetic:tiny-moe", adapter_pack_threads=-1)
