"""The engine's greedy tokens equal transformers + PEFT, for every family, in ONE generate call
that mixes base requests with requests on adapters of different ranks and formats.

Adapters are real PEFT adapters (init_lora_weights=False, so they change the outputs), one in
the target_modules + target_parameters format of PEFT_CASES and a second of another rank. The
engine runs on the CPU in float32 through the native pool, adapter cache and CPU kernels.
A mismatch is excused only where HF's own top-2 logits are within 1e-4 (a near tie).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hf_tiny import FAMILIES, make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from test_lora_peft import PEFT_CASES

MAX_NEW = 8
# A second adapter per family: another rank, attention-only or a different expert target.
SECOND_CASES = {
    "llama": {"r": 7, "lora_alpha": 7, "target_modules": ["q_proj", "up_proj"]},
    "qwen2": {"r": 5, "lora_alpha": 10, "target_modules": ["o_proj", "gate_proj"]},
    "qwen3": {"r": 6, "lora_alpha": 3, "target_modules": ["v_proj", "down_proj"]},
    "mixtral": {"r": 6, "lora_alpha": 12, "target_modules": ["k_proj", "o_proj"],
                    "target_parameters": ["gate_up_proj"]},
    "qwen2_moe": {"r": 7, "lora_alpha": 7, "target_modules": ["q_proj", "shared_expert.down_proj"],
                      "target_parameters": ["down_proj"]},
    "qwen3_moe": {"r": 8, "lora_alpha": 16, "target_modules": ["o_proj"],
                      "target_parameters": ["down_proj"]},
    "olmoe": {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "o_proj"],
                  "target_parameters": ["gate_up_proj"]},
    "gpt_oss": {"r": 6, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj"],
                    "target_parameters": ["down_proj"]},
}


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), do_sample=False, max_new_tokens=MAX_NEW,
                         min_new_tokens=MAX_NEW, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [s[0] for s in out.scores]


def _assert_same_greedy(ours: list[int], theirs: list[int], scores: list[torch.Tensor], what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = torch.topk(scores[i].float(), 2).values
            gap = float(top2[0] - top2[1])
            assert gap < 1e-4, f"{what}: token {i} differs ({a} vs HF {b}), HF top-2 gap {gap}"
            return  # a near tie: the sequences may diverge from here on
    assert len(ours) == len(theirs) == MAX_NEW, what


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_transformers_and_peft(family, tmp_path):
    hf_model, _ = make_tiny(family, tmp_path / "model")
    references = {None: hf_model}
    requests = {}
    for index, (name, case) in enumerate((("first", PEFT_CASES[family]),
                                          ("second", SECOND_CASES[family]))):
        peft_model = peft.get_peft_model(copy.deepcopy(hf_model),
                                         peft.LoraConfig(init_lora_weights=False, **case))
        peft_model.save_pretrained(tmp_path / name)
        references[name] = peft_model.eval()
        requests[name] = LoRARequest(name, index + 1, str(tmp_path / name))

    gen = torch.Generator().manual_seed(1)
    plan = [None, "first", "second", "first", None, "second"]
    prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
               for n in (5, 9, 3, 12, 1, 7)]
    llm = LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32", enable_lora=True,
              max_lora_rank=8, max_loras=2, pool_memory_bytes=32 << 20,
              max_num_batched_tokens=24)  # small budget: prefills are chunked
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                        lora_request=[requests[n] if n else None for n in plan], use_tqdm=False)

    differs_from_base = 0
    for prompt, name, out in zip(prompts, plan, outs):
        with torch.no_grad():
            theirs, scores = _hf_greedy(references[name], prompt)
        ours = out.outputs[0].token_ids
        _assert_same_greedy(ours, theirs, scores, f"{family} adapter={name} prompt={prompt}")
        if name is not None:
            base_tokens, _ = _hf_greedy(hf_model, prompt)
            differs_from_base += base_tokens != theirs
    assert differs_from_base >= 2, "the adapters should change some outputs"
    stats = llm.llm_engine.memory.pool.stats()
    assert stats["kv_pages"] == 0, "finished requests must return their KV pages"


def test_sliding_window_pages_are_released_and_tokens_still_match(tmp_path):
    """GPT-OSS's sliding layer (window 5) gives back its pages of blocks no future query can
    see (block_size 2, prompts of 9-21 tokens, chunked prefills): the greedy tokens still equal
    transformers', also when a tight pool preempts sequences whose pages were partly given back."""
    hf_model, _ = make_tiny("gpt_oss", tmp_path / "model")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
               for n in (21, 9, 14, 17, 12, 19)]
    llm = LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32", block_size=2,
              pool_memory_bytes=8 << 20, max_num_batched_tokens=8)
    engine = llm.llm_engine
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts[:3], outs):
        with torch.no_grad():
            theirs, scores = _hf_greedy(hf_model, prompt)
        _assert_same_greedy(out.outputs[0].token_ids, theirs, scores, f"sliding prompt={prompt}")
    # 21 + 8 tokens, window 5, 2-token blocks: the sliding layer keeps ~3 of 15 blocks.
    assert engine.stats["window_pages_released"] >= 20, engine.stats
    assert engine.memory.pool.stats()["kv_pages"] == 0
    # A pool of 40 pages (a sequence of 29 tokens needs 30 without the release): preemption
    # frees a sequence with some pages already released; the tokens do not change.
    tight = LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32", block_size=2,
                pool_memory_bytes=40 * engine.memory.page_bytes, max_num_batched_tokens=8)
    again = tight.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert tight.llm_engine.stats["preemptions"] > 0
    assert tight.llm_engine.memory.pool.stats()["kv_pages"] == 0
