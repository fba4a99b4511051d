// Bindings of moelora/layer.h (the decoder layer's norms and rotary + KV-write ops).
#pragma once

#include "bindings/common.h"

namespace moelora::bindings {

void register_layer(py::module_& m);

}  // namespace moelora::bindings
