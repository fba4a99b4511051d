"""The offline API, with the names vLLM users know: LLM, SamplingParams, LoRARequest.

    with LLM(model="synthetic:tiny-moe", enable_lora=True, max_lora_rank=16) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16),
                            lora_request=[LoRARequest("a", 1, "/path"), None, ...])

A generate call is atomic: every prompt, SamplingParams and LoRARequest is checked before any is
queued, and a bad one raises ValueError naming its index with nothing queued. Requests that fail
while running (an adapter whose file vanished, a failed step) come back with finish_reason
"error" and the other requests complete. The GPU memory is freed by shutdown(), by leaving a
`with` block, or when the LLM is garbage collected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC

from tqdm.auto import tqdm

from moelora.distributed import executor_for
from moelora.engine.adapters import LoRARequest
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from moelora.engine.request import RequestOutput
from moelora.engine.sampling_params import SamplingParams

logger = logging.getLogger("moelora")


class LLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", enable_lora: bool = False, max_lora_rank: int = 16,
                 max_loras: int = 8, lora_prefetch_slots: int = 0,
                 max_cpu_loras: int | None = None, seed: int = 0,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.85,
                 pool_memory_bytes: int | None = None, block_size: int = 16,
                 max_loras_per_batch: int | None = None, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, decode_graphs: bool | None = None,
                 decode_graph_max_blocks: int = 512, enforce_eager: bool | None = None,
                 max_cudagraph_capture_size: int | None = None,
                 enable_prefix_caching: bool = False, max_logprobs: int = 20,
                 kv_cache_memory_bytes: int | None = None, trust_remote_code: bool = False,
                 synthetic_expert_weights: str | None = None,
                 async_scheduling: bool | None = None, **unsupported):
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise TypeError(f"LLM() got arguments moelora does not support: {names}")
        if trust_remote_code:
            logger.info("trust_remote_code=True is accepted and ignored: moelora runs no code "
                        "from model repositories")
        if kv_cache_memory_bytes is not None:  # vLLM's name for the pool's size
            if pool_memory_bytes is not None and pool_memory_bytes != kv_cache_memory_bytes:
                raise ValueError(f"LLM(): kv_cache_memory_bytes={kv_cache_memory_bytes} "
                                 f"contradicts pool_memory_bytes={pool_memory_bytes}")
            pool_memory_bytes = kv_cache_memory_bytes
        from moelora.hub import resolve_model

        model = resolve_model(model)  # a Hugging Face id: its snapshot in the local cache
        if tokenizer is not None:
            tokenizer = resolve_model(tokenizer)
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device,
            enable_lora=enable_lora, max_lora_rank=max_lora_rank, max_loras=max_loras,
            lora_prefetch_slots=lora_prefetch_slots, max_cpu_loras=max_cpu_loras, seed=seed,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, pool_memory_bytes=pool_memory_bytes,
            block_size=block_size, max_loras_per_batch=max_loras_per_batch,
            tensor_parallel_size=tensor_parallel_size,
            enable_expert_parallel=enable_expert_parallel,
            # vLLM's switch: enforce_eager=True turns the step graphs off, False asks for
            # them; unset = on for CUDA
            decode_graphs=_decode_graphs(decode_graphs, enforce_eager),
            decode_graph_max_blocks=decode_graph_max_blocks,
            max_cudagraph_capture_size=max_cudagraph_capture_size,
            enable_prefix_caching=enable_prefix_caching, max_logprobs=max_logprobs,
            synthetic_expert_weights=synthetic_expert_weights, async_scheduling=async_scheduling)
        self.llm_engine = LLMEngine(config, executor_for(config))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # -- lifetime ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Frees the engine's GPU memory, step graphs and adapter threads; idempotent."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params_list = _broadcast(sampling_params or SamplingParams(), len(prompt_list),
                                 "sampling_params")
        lora_list = _broadcast(lora_request, len(prompt_list), "lora_request")
        engine = self.llm_engine
        prepared = []
        for index, (prompt, params, lora) in enumerate(zip(prompt_list, params_list, lora_list)):
            try:
                prepared.append(engine.prepare_request(prompt, params, lora))
            except (ValueError, TypeError) as error:
                kind = TypeError if isinstance(error, TypeError) else ValueError
                raise kind(f"prompt {index}: {error}") from error
        ids = []
        try:
            for request in prepared:
                request_id = engine.next_request_id()
                engine.add_prepared(request_id, request)
                ids.append(request_id)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this model has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": tokenizer.encode(
            tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                          chat_template=chat_template),
            add_special_tokens=False)} for conv in conversations]
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        finally:
            bar.close()
            for request_id in request_ids:  # interrupted: leave nothing queued behind
                if request_id not in finished:
                    engine.abort_request(request_id)
        return [finished[r] for r in request_ids]


def _decode_graphs(decode_graphs: bool | None, enforce_eager: bool | None) -> bool | None:
    if decode_graphs is not None and enforce_eager is not None and decode_graphs == enforce_eager:
        raise ValueError(f"LLM(): decode_graphs={decode_graphs} contradicts "
                         f"enforce_eager={enforce_eager}")
    if decode_graphs is not None:
        return decode_graphs
    return None if enforce_eager is None else not enforce_eager


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, SequenceABC) and prompts and all(isinstance(t, int) for t in prompts):
        return [{"prompt_token_ids": list(prompts)}]
    return list(prompts)


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n
