// The whole public API of libmoelora.
#pragma once

#include "moelora/adapter_cache.h"
#include "moelora/arena.h"
#include "moelora/copy_engine.h"
#include "moelora/dtype.h"
#include "moelora/error.h"
#include "moelora/ops.h"
#include "moelora/page_pool.h"
#include "moelora/plan.h"
#include "moelora/row_layout.h"
#include "moelora/runtime.h"
#include "moelora/safetensors.h"
#include "moelora/tensor_ref.h"
#include "moelora/version.h"
