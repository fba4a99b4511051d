"""Graphs captured by torch and replayed by libmoelora at their kernels' own priorities
(moelora/graph_exec.h, engine/priority_graph.py). The GPU tests are marked gpu."""

from __future__ import annotations

import pytest
import torch
from moelora import _C
from moelora.engine.priority_graph import PriorityGraph


def test_a_null_graph_is_refused_by_name():
    error = _C.InvalidArgument if _C.built_with_cuda() else _C.CudaError
    with pytest.raises(error, match="graph" if _C.built_with_cuda() else "no CUDA backend"):
        _C.GraphExec(0, 0)


@pytest.mark.skipif(_C.built_with_cuda(), reason="a CUDA build")
def test_a_build_without_cuda_says_so():
    with pytest.raises(_C.CudaError, match="no CUDA backend"):
        _C.graph_kernel_priorities(1)


def _capture_two_streams(device: torch.device):
    """A graph whose main stream scales x while a high-priority side stream, forked from it,
    adds 1 to y; the main stream then joins it and sums both. Returns (graph, inputs, output,
    the side stream's priority)."""
    x = torch.randn(4099, device=device)
    y = torch.randn(4099, device=device)
    side = torch.cuda.Stream(device, priority=-100)
    graph = PriorityGraph(device)
    warm = torch.cuda.Stream(device)
    with torch.cuda.stream(warm):
        (x * 3).add_(y + 1)
    torch.cuda.synchronize(device)
    with torch.cuda.graph(graph.graph):
        main = torch.cuda.current_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shifted = y + 1
        scaled = x * 3
        main.wait_stream(side)
        out = scaled + shifted
    graph.instantiate()
    return graph, (x, y), out, side.priority


@pytest.mark.gpu
@pytest.mark.parametrize("node_priorities", [True, False])
def test_gpu_replays_compute_what_torch_replays_compute(node_priorities):
    device = torch.device("cuda", torch.cuda.current_device())
    graph, (x, y), out, _ = _capture_two_streams(device)
    assert graph.node_priorities
    for seed in range(3):
        gen = torch.Generator(device=device).manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=gen, device=device))
        y.copy_(torch.randn(y.shape, generator=gen, device=device))
        out.fill_(float("nan"))
        graph.replay(node_priorities)
        torch.cuda.synchronize(device)
        assert torch.equal(out, x * 3 + (y + 1))


@pytest.mark.gpu
def test_gpu_kernel_nodes_keep_their_capturing_streams_priority():
    device = torch.device("cuda", torch.cuda.current_device())
    graph, _, _, side_priority = _capture_two_streams(device)
    priorities = graph.kernel_priorities()
    assert side_priority < 0  # the device has stream priorities (every sm_90 part does)
    assert sorted(priorities) == sorted([0, side_priority, 0])


@pytest.mark.gpu
def test_gpu_graph_exec_replays_a_kept_torch_graph():
    """_C.GraphExec straight over torch's kept graph (node priorities by default), launched on
    torch's stream, runs the captured work on the inputs' current values."""
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.ones(1000, device=device)
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        y = x * 2
    executable = _C.GraphExec(graph.raw_cuda_graph(), device.index)
    assert executable.node_priorities
    x.fill_(5)
    executable.launch(torch.cuda.current_stream(device).cuda_stream)
    torch.cuda.synchronize(device)
    assert torch.equal(y, torch.full_like(x, 10))
