// Placeholder replaced by the component's own bindings.
#include "bindings/common.h"

namespace moelora::bindings {
void register_adapter_cache(py::module_& m) {}
}  // namespace moelora::bindings
