"""moe_router_logits (the router GEMM of decode steps) against a float64 torch reference written
here: the CPU reference everywhere, the CUDA kernel (marked gpu) against it and against float64,
at odd sizes, with and without a bias, strided rows and rows that are not 16-byte aligned."""

from __future__ import annotations

import pytest
import torch
from moelora import InvalidArgument
from moelora.ops import moe as moe_ops

# (rtol, atol) against float64 rounded to the dtype; the sums differ in order only.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tokens, hidden, experts
SHAPES = [(1, 2880, 32), (7, 111, 13), (16, 2048, 128), (133, 888, 8), (64, 4096, 8)]


def make_case(tokens, hidden, experts, dtype, bias, seed, pad=8):
    """x with a row stride of hidden + pad (pad 0: contiguous), weight, optional bias; values
    scaled so the logits are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden + pad, generator=gen) * 0.5).to(dtype)[:, :hidden]
    weight = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).to(dtype)
    b = (torch.randn(experts, generator=gen) * 0.1).to(dtype) if bias else None
    return x, weight, b


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def check(got, x, weight, bias):
    rtol, atol = TOLERANCE[x.dtype]
    expected = reference(x, weight, bias)
    assert got.dtype == x.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.cpu().double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_router_logits_match_float64(tokens, hidden, experts, dtype, bias):
    x, weight, b = make_case(tokens, hidden, experts, dtype, bias, tokens + hidden + experts)
    check(moe_ops.router_logits(x, weight, b, native=True), x, weight, b)


def test_cpu_router_logits_round_once_after_the_bias():
    """x . w = 1 + 3/8 of a bf16 step, bias 1/4 step: rounded once the sum goes up a step;
    rounded before the bias as well it would stay at 1."""
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    weight = torch.tensor([[1.0, 3 * 2.0**-10]], dtype=torch.bfloat16)
    bias = torch.tensor([2.0**-9], dtype=torch.bfloat16)
    got = moe_ops.router_logits(x, weight, bias, native=True)
    assert got.item() == 1.0 + 2.0**-7


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, b: (x, w.float(), b), "weight must have the dtype of x"),
    (lambda x, w, b: (x, w[:, :-1], b), "the hidden size of x"),
    (lambda x, w, b: (x, w, b[:-1]), "one entry per expert"),
    (lambda x, w, b: (x, w, b.float()), "bias must have the dtype of x"),
    (lambda x, w, b: (x.t(), w, b), "x"),
    (lambda x, w, b: (x, w[:0], None), "a row per expert"),
])
def test_router_logits_reject_bad_arguments(mutate, match):
    x, weight, b = make_case(4, 16, 8, torch.bfloat16, True, 0, pad=0)
    x, weight, b = mutate(x, weight, b)
    with pytest.raises(InvalidArgument, match=match):
        moe_ops.router_logits(x, weight, b, native=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts", SHAPES)
@pytest.mark.parametrize("bias,pad", [(False, 8), (True, 0), (True, 3)])
def test_gpu_router_logits_match_cpu_and_float64(tokens, hidden, experts, dtype, bias, pad):
    """pad 3: rows not 16-byte aligned (the scalar kernel); 8 in float32: aligned, strided."""
    x, weight, b = make_case(tokens, hidden, experts, dtype, bias, tokens * 7 + experts, pad)
    on_gpu = [None if t is None else t.cuda() for t in (x, weight, b)]
    logits = torch.full((tokens, experts), float("nan"), dtype=dtype, device="cuda")
    got = moe_ops.router_logits(*on_gpu, native=True)
    logits.copy_(got)
    check(logits, x, weight, b)
    cpu = moe_ops.router_logits(x, weight, b, native=True)
    torch.testing.assert_close(logits.cpu(), cpu, rtol=TOLERANCE[dtype][0],
                               atol=TOLERANCE[dtype][1])


@pytest.mark.gpu
def test_gpu_router_logits_are_the_rule_at_decode_and_repeat_in_a_graph():
    x, weight, b = [t.cuda() for t in make_case(16, 2880, 32, torch.bfloat16, True, 3, pad=0)]
    first = moe_ops.router_logits(x, weight, b)  # the rule: native at 16 tokens
    assert torch.equal(first, moe_ops.router_logits(x, weight, b, native=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_ops.router_logits(x, weight, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)
