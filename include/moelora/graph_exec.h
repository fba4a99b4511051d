// Executable CUDA graphs made from graphs captured elsewhere (torch's cudaGraph_t), instantiated
// so that a replay honours each kernel node's priority. Stream capture copies the capturing
// stream's priority into every kernel node it records, but an executable graph ignores those
// priorities unless it is instantiated to use them: kernels forked onto a high-priority stream
// during capture (the decode step's LoRA kernels) then have their CTAs dispatched ahead of the
// pending CTAs of the base GEMM beside them, instead of after the GEMM's whole grid.
#pragma once

#include <cstdint>
#include <vector>

namespace moelora {

class GraphExec {
 public:
  // `graph` is a cudaGraph_t as an integer (torch.cuda.CUDAGraph(keep_graph=True)'s
  // raw_cuda_graph()); it is instantiated on CUDA device `device`. The graph may be destroyed
  // afterwards: the executable graph is independent of it. Throws InvalidArgument for a null
  // graph, CudaError where instantiation fails or the library has no CUDA backend.
  GraphExec(std::uintptr_t graph, int device, bool node_priorities);
  ~GraphExec();
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;

  // Enqueues one replay on `stream` (a cudaStream_t as an integer; 0 is the legacy stream).
  void launch(std::uintptr_t stream) const;
  bool node_priorities() const { return node_priorities_; }

 private:
  void* exec_ = nullptr;  // cudaGraphExec_t
  bool node_priorities_;
};

// The priority attribute of each kernel node of `graph` (a cudaGraph_t as an integer), in the
// graph's node order: what a replay with node priorities runs them at.
std::vector<int> graph_kernel_priorities(std::uintptr_t graph);

}  // namespace moelora
