// GraphExec: cudaGraphInstantiateWithFlags with cudaGraphInstantiateFlagUseNodePriority over a
// graph captured by another runtime instance (torch's). Runtime graph handles are the driver's
// (CUgraph, CUgraphExec), so a graph made through one runtime is instantiated through another.
#include "moelora/graph_exec.h"

#include "cuda_check.h"
#include "moelora/error.h"

namespace moelora {

#ifdef MOELORA_WITH_CUDA
namespace {

// Makes `device` current for the scope (the runtime's current device is per thread).
class CurrentDevice {
 public:
  explicit CurrentDevice(int device) {
    MOELORA_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MOELORA_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CurrentDevice() { cudaSetDevice(previous_); }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = 0;
};

cudaGraph_t as_graph(std::uintptr_t graph) {
  if (graph == 0) throw InvalidArgument("graph: a null cudaGraph_t");
  return reinterpret_cast<cudaGraph_t>(graph);
}

}  // namespace

GraphExec::GraphExec(std::uintptr_t graph, int device, bool node_priorities)
    : node_priorities_(node_priorities) {
  cudaGraph_t source = as_graph(graph);
  CurrentDevice current(device);
  cudaGraphExec_t exec = nullptr;
  const unsigned long long flags = node_priorities ? cudaGraphInstantiateFlagUseNodePriority : 0;
  MOELORA_CUDA_CHECK(cudaGraphInstantiateWithFlags(&exec, source, flags));
  exec_ = exec;
}

GraphExec::~GraphExec() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

void GraphExec::launch(std::uintptr_t stream) const {
  MOELORA_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_),
                                     reinterpret_cast<cudaStream_t>(stream)));
}

std::vector<int> graph_kernel_priorities(std::uintptr_t graph) {
  cudaGraph_t source = as_graph(graph);
  size_t count = 0;
  MOELORA_CUDA_CHECK(cudaGraphGetNodes(source, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  MOELORA_CUDA_CHECK(cudaGraphGetNodes(source, nodes.data(), &count));
  std::vector<int> priorities;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    MOELORA_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaKernelNodeAttrValue value{};
    MOELORA_CUDA_CHECK(
        cudaGraphKernelNodeGetAttribute(node, cudaKernelNodeAttributePriority, &value));
    priorities.push_back(value.priority);
  }
  return priorities;
}

#else

GraphExec::GraphExec(std::uintptr_t, int, bool) : node_priorities_(false) {
  throw CudaError("GraphExec: this build of libmoelora has no CUDA backend");
}
GraphExec::~GraphExec() = default;
void GraphExec::launch(std::uintptr_t) const {}
std::vector<int> graph_kernel_priorities(std::uintptr_t) {
  throw CudaError("graph_kernel_priorities: this build of libmoelora has no CUDA backend");
}

#endif

}  // namespace moelora
