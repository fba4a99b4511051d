// Placeholder until the cluster kernel lands: declines every call.
#include "lora_kernels.h"
namespace moelora::cuda {
bool launch_lora_cluster(const LoraArgs&, DType, LoraVectorization, int64_t, cudaStream_t) {
  return false;
}
}  // namespace moelora::cuda
