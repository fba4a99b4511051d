// The registry of kernel modules and their preload (kernel_modules.h), over the driver API's
// module enumeration, reached through the runtime's driver entry points (no -lcuda).
#include <cuda.h>

#include <mutex>
#include <string>
#include <vector>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"

namespace moelora::cuda::detail {

namespace {

struct Registry {
  std::mutex mutex;
  std::vector<const void*> anchors;
};

Registry& registry() {
  static Registry r;  // function-local: registrations run during static initialisation
  return r;
}

using FuncGetModule = CUresult (*)(CUmodule*, CUfunction);
using ModuleGetFunctionCount = CUresult (*)(unsigned int*, CUmodule);
using ModuleEnumerateFunctions = CUresult (*)(CUfunction*, unsigned int, CUmodule);
using FuncIsLoaded = CUresult (*)(CUfunctionLoadingState*, CUfunction);
using FuncLoad = CUresult (*)(CUfunction);

constexpr unsigned int kDriverVersion = 12040;  // the driver API version that has them all

template <typename F>
F driver_entry(const char* symbol) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
  if (cudaGetDriverEntryPointByVersion(symbol, &fn, kDriverVersion, cudaEnableDefault,
                                       &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    throw CudaError(std::string("preloading kernels needs the driver's ") + symbol +
                    " (CUDA 12.4 or newer)");
  }
  return reinterpret_cast<F>(fn);
}

void check(CUresult result, const char* what) {
  if (result != CUDA_SUCCESS) {
    throw CudaError(std::string("preloading kernels: ") + what + " failed (CUresult " +
                    std::to_string(static_cast<int>(result)) + ")");
  }
}

}  // namespace

bool register_kernel_module(const void* anchor) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.anchors.push_back(anchor);
  return true;
}

KernelPreload preload_kernel_modules() {
  static const auto get_module = driver_entry<FuncGetModule>("cuFuncGetModule");
  static const auto count_of = driver_entry<ModuleGetFunctionCount>("cuModuleGetFunctionCount");
  static const auto enumerate = driver_entry<ModuleEnumerateFunctions>(
      "cuModuleEnumerateFunctions");
  static const auto is_loaded = driver_entry<FuncIsLoaded>("cuFuncIsLoaded");
  static const auto load = driver_entry<FuncLoad>("cuFuncLoad");
  std::vector<const void*> anchors;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    anchors = r.anchors;
  }
  KernelPreload out;
  std::vector<CUfunction> functions;
  for (const void* anchor : anchors) {
    cudaFunction_t handle = nullptr;
    MOELORA_CUDA_CHECK(cudaGetFuncBySymbol(&handle, anchor));
    CUmodule module = nullptr;
    check(get_module(&module, reinterpret_cast<CUfunction>(handle)), "cuFuncGetModule");
    unsigned int count = 0;
    check(count_of(&count, module), "cuModuleGetFunctionCount");
    functions.assign(count, nullptr);
    check(enumerate(functions.data(), count, module), "cuModuleEnumerateFunctions");
    for (CUfunction f : functions) {
      CUfunctionLoadingState state = CU_FUNCTION_LOADING_STATE_UNLOADED;
      check(is_loaded(&state, f), "cuFuncIsLoaded");
      if (state != CU_FUNCTION_LOADING_STATE_LOADED) {
        check(load(f), "cuFuncLoad");
        ++out.newly_loaded;
      }
    }
    out.kernels += count;
    ++out.modules;
  }
  return out;
}

}  // namespace moelora::cuda::detail

MOELORA_KERNEL_MODULE()
