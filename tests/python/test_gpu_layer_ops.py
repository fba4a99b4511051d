"""The CUDA kernels of cuda/layer/ against the CPU ops and float64: rms_norm / add_rms_norm
(vectorised, vector + scalar tail, and scalar rows; float32 and activation-dtype weights; in
place), rope_qk / rope_kv_write (every head size class, GQA, Qwen3's head norm, slot -1 rows,
strided QKV views, the exact bytes of the pages), and all of them replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from layer_reference import (
    TOLERANCE,
    expected_arena,
    inv_freq_of,
    make_cache,
    qkv_views,
    rms_norm_ref,
    rope_ref,
)
from moelora.ops import layer as layer_ops

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def two_roundings(dtype):
    """GPU and CPU differ in the float32 reduction order and libm: the dtype's intermediate
    rounding may flip, so up to two roundings apart."""
    return {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def assert_matches(gpu, cpu, ref64, dtype):
    """Against the CPU op within two roundings of the dtype, and against float64."""
    assert torch.isfinite(gpu).all()
    scale = ref64.abs().max().item()
    tol = two_roundings(dtype)
    torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=tol, atol=tol * scale)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(gpu.cpu().double(), ref64, rtol=rtol, atol=atol * scale)


def strided_rows(tokens, width, stride, dtype, gen, offset=0):
    """[tokens, width] rows inside a [tokens, stride] buffer starting at column `offset`."""
    full = torch.randn(tokens, stride, generator=gen, dtype=torch.float64).to(dtype)
    return full[:, offset:offset + width]


NORM_SHAPES = [  # tokens, hidden, row stride, column offset: which path the launcher takes
    (1, 111, 111, 0),  # unaligned rows: scalar
    (7, 2880, 2880, 0),  # gpt-oss: vectors
    (133, 2884, 2896, 0),  # aligned rows, H % 8 = 4: vectors + scalar tail
    (133, 2048, 2064, 1),  # misaligned start: scalar
    (64, 8192, 8192, 0),  # wider than 1024 threads x one vector
    (3, 20000, 20000, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,stride,offset", NORM_SHAPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_gpu_rms_norm_matches_cpu_and_float64(dtype, tokens, hidden, stride, offset, weight_fp32,
                                              add):
    gen = torch.Generator().manual_seed(tokens * hidden + add)
    x = strided_rows(tokens, hidden, stride, dtype, gen, offset)
    residual = strided_rows(tokens, hidden, stride, dtype, gen, offset) if add else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(
        torch.float32 if weight_fp32 else dtype)
    x_gpu = x.cuda() if offset == 0 and stride == hidden else _to_cuda_strided(x, stride, offset)
    out_gpu = torch.full((tokens, hidden), float("nan"), dtype=dtype, device="cuda")
    if add:
        res_gpu = _to_cuda_strided(residual, stride, offset)
        expect_residual = residual + x
        cpu = layer_ops.add_rms_norm(x, residual.clone(), weight, 1e-5)
        layer_ops.add_rms_norm(x_gpu, res_gpu, weight.cuda(), 1e-5, out=out_gpu)
        assert torch.equal(res_gpu.cpu(), expect_residual)  # the add rounds exactly like torch
        ref = rms_norm_ref(expect_residual.double(), weight, 1e-5)
    else:
        cpu = layer_ops.rms_norm(x, weight, 1e-5)
        layer_ops.rms_norm(x_gpu, weight.cuda(), 1e-5, out=out_gpu)
        ref = rms_norm_ref(x.double(), weight, 1e-5)
    assert_matches(out_gpu, cpu, ref, dtype)


def _to_cuda_strided(t, stride, offset):
    """t's values in a CUDA buffer with the same row stride and column offset (NaN padding)."""
    full = torch.full((t.shape[0], stride), float("nan"), dtype=t.dtype, device="cuda")
    view = full[:, offset:offset + t.shape[1]]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rms_norm_in_place(dtype):
    gen = torch.Generator().manual_seed(3)
    x = strided_rows(133, 2880, 2880, dtype, gen)
    weight = torch.randn(2880, generator=gen).to(dtype)
    cpu = layer_ops.rms_norm(x, weight, 1e-6)
    x_gpu = x.cuda()
    assert layer_ops.rms_norm(x_gpu, weight.cuda(), 1e-6, out=x_gpu) is x_gpu
    assert_matches(x_gpu, cpu, rms_norm_ref(x.double(), weight, 1e-6), dtype)


ROPE_CASES = [  # tokens, Hq, Hkv, head_dim, rope type
    (1, 64, 8, 64, "yarn"),  # gpt-oss-20b decode
    (64, 64, 8, 64, "yarn"),
    (7, 32, 4, 128, "default"),  # qwen3-30b-a3b
    (133, 32, 4, 128, "llama3"),
    (133, 4, 2, 48, "default"),  # D/2 = 24
    (7, 3, 3, 256, "default"),
    (7, 2, 1, 2, "default"),
    (1000, 8, 1, 64, "default"),  # a prefill chunk
]


def _positions(tokens, gen):
    small = torch.randint(0, 64, (tokens,), generator=gen)
    large = torch.randint(0, 131072, (tokens,), generator=gen)
    return torch.where(torch.arange(tokens) % 2 == 0, small, large).to(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,dim,rope_type", ROPE_CASES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gpu_rope_kv_write_matches_cpu_and_float64(dtype, tokens, hq, hkv, dim, rope_type,
                                                   qk_norm):
    gen = torch.Generator().manual_seed(tokens * dim + hq + qk_norm)
    q, k, v = qkv_views(tokens, hq, hkv, dim, dtype, gen)
    positions = _positions(tokens, gen)
    inv_freq, scaling = inv_freq_of(rope_type, dim)
    q_norm = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype) if qk_norm else None
    k_norm = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype) if qk_norm else None
    num_pages = tokens // 16 + 6
    slots = torch.randperm(num_pages * 16, generator=gen)[:tokens].to(torch.int64)
    slots[::3] = -1
    q_ref = rope_ref(q, positions, inv_freq, scaling, q_norm, 1e-6)
    k_ref = rope_ref(k, positions, inv_freq, scaling, k_norm, 1e-6)

    q_cpu, k_cpu, v_cpu = (t.clone() for t in (q, k, v))
    cache_cpu, arena_cpu, page_bytes = make_cache(num_pages, hkv, dim, dtype)
    layer_ops.rope_kv_write(q_cpu, k_cpu, v_cpu, positions, inv_freq, slots, cache_cpu, scaling,
                            q_norm, k_norm, 1e-6)

    qkv_gpu = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1).cuda()
    q_gpu, k_gpu, v_gpu = (t.view(tokens, -1, dim) for t in
                           qkv_gpu.split([hq * dim, hkv * dim, hkv * dim], dim=1))
    cache, arena, _ = make_cache(num_pages, hkv, dim, dtype, device="cuda")
    opt = (lambda t: None if t is None else t.cuda())
    layer_ops.rope_kv_write(q_gpu, k_gpu, v_gpu, positions.cuda(), inv_freq.cuda(), slots.cuda(),
                            cache, scaling, opt(q_norm), opt(k_norm), 1e-6)
    assert_matches(q_gpu, q_cpu, q_ref, dtype)
    assert_matches(k_gpu, k_cpu, k_ref, dtype)
    assert torch.equal(v_gpu.cpu(), v)
    # pages: exactly the GPU's own rotated keys and the values at the slots, nothing elsewhere
    assert torch.equal(arena.cpu(), expected_arena(torch.full_like(arena_cpu, 0xFF), page_bytes,
                                                   slots, k_gpu, v_gpu))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rope_qk_without_cache(dtype):
    gen = torch.Generator().manual_seed(8)
    q, k, _ = qkv_views(133, 32, 4, 128, dtype, gen)
    positions = _positions(133, gen)
    inv_freq, scaling = inv_freq_of("yarn", 128)
    q_cpu, k_cpu = q.clone(), k.clone()
    layer_ops.rope_qk(q_cpu, k_cpu, positions, inv_freq, scaling)
    q_gpu, k_gpu = q.cuda(), k.cuda()
    layer_ops.rope_qk(q_gpu, k_gpu, positions.cuda(), inv_freq.cuda(), scaling)
    assert_matches(q_gpu, q_cpu, rope_ref(q, positions, inv_freq, scaling), dtype)
    assert_matches(k_gpu, k_cpu, rope_ref(k, positions, inv_freq, scaling), dtype)


def test_gpu_layer_ops_replay_from_a_cuda_graph():
    """add_rms_norm + rope_kv_write captured once and replayed on new inputs (new residual,
    activations, positions and slots) give what the eager ops give on the same inputs."""
    tokens, hq, hkv, dim, hidden, dtype = 16, 64, 8, 64, 2880, torch.bfloat16
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(hidden, generator=gen).float().to(dev)
    inv_freq, scaling = inv_freq_of("yarn", dim)
    inv_freq = inv_freq.to(dev)
    x = torch.empty(tokens, hidden, dtype=dtype, device=dev)
    residual = torch.empty_like(x)
    normed = torch.empty_like(x)
    qkv = torch.empty(tokens, (hq + 2 * hkv) * dim, dtype=dtype, device=dev)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([hq * dim, hkv * dim, hkv * dim], 1))
    positions = torch.zeros(tokens, dtype=torch.int64, device=dev)
    slots = torch.full((tokens,), -1, dtype=torch.int64, device=dev)
    cache, arena, _ = make_cache(4, hkv, dim, dtype, device="cuda")

    def step():
        layer_ops.add_rms_norm(x, residual, weight, 1e-5, out=normed)
        layer_ops.rope_kv_write(q, k, v, positions, inv_freq, slots, cache, scaling)

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(tokens, hidden, generator=g))
        residual.copy_(torch.randn(tokens, hidden, generator=g))
        qkv.copy_(torch.randn(qkv.shape, generator=g))
        positions.copy_(torch.randint(0, 4096, (tokens,), generator=g))
        chosen = torch.randperm(64, generator=g)[:tokens]
        chosen[::4] = -1
        slots.copy_(chosen)
        arena.fill_(0xFF)

    fill(0)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    results = []
    for replay in (True, False):
        fill(1)
        graph.replay() if replay else step()
        torch.cuda.synchronize()
        results.append([t.clone() for t in (residual, normed, qkv, arena)])
    for graphed, eager in zip(*results):
        assert torch.equal(graphed, eager)
