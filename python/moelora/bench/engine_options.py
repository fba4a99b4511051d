"""How a benchmark asks the engine for experts stored as MXFP4 or FP8 (synthetic models).

The option lives in EngineConfig under the name the model code gives it; this module looks for
it by name, so the benchmarks run on builds with and without it. None: no such option, and the
caller says so in its records; the weights actually built are read from the model afterwards
(weight_bytes.stored_layout), never assumed.
"""

from __future__ import annotations

import dataclasses

_OPTION_NAMES = ("synthetic_expert_weights", "quantization", "weights", "expert_weights",
                 "synthetic_weights")


def weights_options(weights: str) -> dict | None:
    """EngineConfig keywords that build experts as `weights` ("bf16" = the model dtype), or
    None when the engine has no such option (then only bf16 is possible: {})."""
    from moelora.engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for name in _OPTION_NAMES:
        if name in fields:
            return {name: "dense" if weights == "bf16" else weights}
    return {} if weights == "bf16" else None
