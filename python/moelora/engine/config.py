"""Engine configuration (the knobs of LLM(...) and `moelora serve`), validated up front."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moelora.models.config import EXPERT_FORMATS

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 8  # adapters resident on the device at once (slots)
    # Device slots beyond max_loras that no step uses: adapters that queued requests wait for
    # load into them while the step's adapters hold the others (see device_lora_slots).
    lora_prefetch_slots: int = 0
    # adapters kept in host memory (default: 4 * max_loras, and at least the device slots)
    max_cpu_loras: int | None = None
    max_loras_per_batch: int | None = None  # distinct adapters in one step (default: max_loras)
    adapter_load_threads: int = 4  # host threads reading and packing adapters from disk
    adapter_pack_threads: int = 0  # threads packing one adapter (0: cpu count / load threads)
    # host copies page-locked in blocks of about this many bytes beside the read (0: one block
    # per adapter, page-locked before it; see moelora/adapter_cache.h AdapterCacheConfig)
    adapter_host_block_bytes: int = 8 << 20
    # Host memory kept ready for adapters' host copies (faulted in and page-locked ahead by idle
    # reader threads, made again as loads take it), so that a cold load does neither on its
    # path. None: room for one largest adapter (max_lora_rank on every site) per device slot
    # (at least per load thread), at most 16 GiB and 1/8 of the machine's memory; 0: none.
    adapter_host_reserve_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.85
    # The unified pool's size in bytes, on either device (vLLM's kv_cache_memory_bytes); default
    # from gpu_memory_utilization on a GPU, 512 MiB on the CPU.
    pool_memory_bytes: int | None = None
    max_logprobs: int = 20  # largest logprobs / prompt_logprobs a request may ask for (vLLM's)
    seed: int = 0
    load_progress: bool = True
    synthetic_num_layers: int | None = None  # build only this many layers (synthetic models)
    # How a synthetic model stores its expert stacks: "dense", "mxfp4" or "fp8" (None: as the
    # real checkpoint ships them; synthetic:gpt-oss-20b in MXFP4, the others dense).
    synthetic_expert_weights: str | None = None
    # Steps of up to max_cudagraph_capture_size tokens (decode, and prefill beside decodes)
    # through padded static buffers, captured as CUDA graphs on a GPU (run eagerly on the CPU).
    # None = on for a one-process CUDA engine (vLLM's default; measured 1.5x shorter TPOT on the
    # H200, docs/performance.md), off elsewhere; True also for a parallel engine (each rank
    # captures its pure-decode steps, collectives included; not yet measured on GPUs).
    decode_graphs: bool | None = None
    # The largest step (in tokens) replayed from a graph (vLLM's max_cudagraph_capture_size);
    # None: max_num_seqs, or 256 where that is larger, within max_num_batched_tokens.
    max_cudagraph_capture_size: int | None = None
    # Reuse the KV blocks of identical prompt prefixes (same adapter) across requests.
    enable_prefix_caching: bool = False
    decode_graph_max_blocks: int = 512  # block-table width of the graphs; longer runs eagerly
    # Schedule step N+1 while the GPU runs step N (vLLM's async scheduling). None = on for a
    # one-process CUDA engine, off elsewhere.
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # processes, one per GPU (moelora.distributed)
    enable_expert_parallel: bool = False  # partition experts over them instead of sharding

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA GPU")
        for name in ("max_lora_rank", "max_loras", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "adapter_load_threads", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_prefetch_slots < 0:
            raise ValueError(f"lora_prefetch_slots must be >= 0, got {self.lora_prefetch_slots}")
        if self.adapter_pack_threads < 0:
            raise ValueError(f"adapter_pack_threads must be >= 0, got {self.adapter_pack_threads}")
        if self.adapter_host_block_bytes < 0:
            raise ValueError("adapter_host_block_bytes must be >= 0, got "
                             f"{self.adapter_host_block_bytes}")
        if self.adapter_host_reserve_bytes is not None and self.adapter_host_reserve_bytes < 0:
            raise ValueError("adapter_host_reserve_bytes must be >= 0, got "
                             f"{self.adapter_host_reserve_bytes}")
        if self.adapter_host_reserve_bytes and self.adapter_host_block_bytes == 0:
            raise ValueError("adapter_host_reserve_bytes needs adapter_host_block_bytes > 0 (the "
                             "reserve is made of blocks)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2:
            raise ValueError("enable_expert_parallel partitions experts over the "
                             "tensor_parallel_size processes: it needs tensor_parallel_size >= 2")
        for name in ("synthetic_num_layers", "synthetic_expert_weights"):
            if getattr(self, name) is not None and not self.model.startswith("synthetic:"):
                raise ValueError(f"{name} applies to synthetic:<preset> models only, not "
                                 f"{self.model!r}")
        if self.synthetic_expert_weights not in (None, *EXPERT_FORMATS):
            raise ValueError(f"synthetic_expert_weights must be one of {EXPERT_FORMATS} (or "
                             f"None: as the real checkpoint), got {self.synthetic_expert_weights!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(4 * self.max_loras, self.device_lora_slots)
        if self.max_cpu_loras < self.device_lora_slots:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= the device slots "
                             f"(max_loras {self.max_loras} + lora_prefetch_slots "
                             f"{self.lora_prefetch_slots})")
        if self.max_cudagraph_capture_size is None:
            self.max_cudagraph_capture_size = min(self.max_num_batched_tokens,
                                                  max(256, self.max_num_seqs))
        if self.max_cudagraph_capture_size < 1:
            raise ValueError("max_cudagraph_capture_size must be >= 1, got "
                             f"{self.max_cudagraph_capture_size}")
        if self.max_loras_per_batch is None:
            self.max_loras_per_batch = self.max_loras
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.pool_memory_bytes is not None and self.pool_memory_bytes <= 0:
            raise ValueError(f"pool_memory_bytes must be > 0, got {self.pool_memory_bytes}")

    @property
    def device_lora_slots(self) -> int:
        """Adapters resident on the device at once: max_loras, plus the prefetch slots, where
        adapters load while a step runs with max_loras_per_batch (default max_loras) of them."""
        return self.max_loras + self.lora_prefetch_slots

    def synthetic_overrides(self) -> dict:
        """The keyword arguments load_model passes to build_synthetic (empty for checkpoints)."""
        overrides = {"num_layers": self.synthetic_num_layers,
                     "expert_weights": self.synthetic_expert_weights}
        return {k: v for k, v in overrides.items() if v is not None}

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cpu":
            return torch.float32  # CPU kernels are fastest and exact in float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) \
            else torch.bfloat16
