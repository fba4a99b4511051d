"""A captured CUDA graph replayed at its kernels' own priorities.

Stream capture records, in every kernel node, the priority of the stream that launched it, but
an executable graph runs every node at the priority of the stream it is launched into unless it
was instantiated to use the nodes' own (cudaGraphInstantiateFlagUseNodePriority), which torch's
CUDAGraph does not ask for. A decode step forks its LoRA kernels onto a high-priority stream
(engine/paged_context.py, lora_stream) so that they run beside the base GEMM; with the nodes'
priorities the GPU dispatches a LoRA kernel's CTAs ahead of the GEMM's pending CTAs as soon as
room frees, instead of after the GEMM's whole grid. So the graph is captured with torch
(keep_graph: torch keeps the cudaGraph_t and the memory pool) and instantiated by libmoelora
(moelora/graph_exec.h). Where torch cannot keep the graph, or the library has no CUDA backend,
the graph replays through torch as before.
"""

from __future__ import annotations

import logging

import torch
from moelora import _C

log = logging.getLogger("moelora")


class PriorityGraph:
    def __init__(self, device: torch.device):
        self.device = device
        try:
            self.graph = torch.cuda.CUDAGraph(keep_graph=True)
            self._kept = True
        except TypeError:  # a torch without keep_graph
            self.graph = torch.cuda.CUDAGraph()
            self._kept = False
        self._exec = None

    def instantiate(self) -> None:
        """Call once the capture has ended."""
        if not self._kept or not _C.built_with_cuda() or \
                not hasattr(self.graph, "raw_cuda_graph"):
            return
        index = self.device.index if self.device.index is not None \
            else torch.cuda.current_device()
        try:
            self._exec = _C.GraphExec(self.graph.raw_cuda_graph(), index, node_priorities=True)
        except _C.CudaError as error:
            log.warning("step graph replays at the launch stream's priority: %s", error)

    @property
    def node_priorities(self) -> bool:
        """Whether replay() can run the kernels at their own priorities."""
        return self._exec is not None

    def replay(self, node_priorities: bool = True) -> None:
        """Enqueues a replay on the current stream: at the nodes' priorities where asked and
        possible, else through torch (which instantiates its own executable graph on first
        use)."""
        if node_priorities and self._exec is not None:
            self._exec.launch(torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.graph.replay()

    def kernel_priorities(self) -> list[int]:
        """The priority recorded in each kernel node, in the graph's node order."""
        if not self._kept:
            raise RuntimeError("this torch keeps no captured graph to inspect (keep_graph)")
        return _C.graph_kernel_priorities(self.graph.raw_cuda_graph())
