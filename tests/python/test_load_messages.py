"""Messages that name the real cause (issue: drop-in for vLLM users, item 8): an adapter trained
for another base model says so, a model directory without a tokenizer warns at load, a tokenizer
whose vocabulary the model cannot embed is refused. Real demo checkpoints and PEFT files."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from moelora import LLM, LoRARequest, SamplingParams
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models


def _llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, device="cpu", max_num_seqs=2, max_model_len=64, **kwargs)


def test_an_adapter_of_another_base_model_says_so(assets, tmp_path):
    model_dir, adapters = assets
    other = tmp_path / "llama-adapter"
    other.mkdir()
    with open(os.path.join(adapters["poet"], "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(os.path.join(adapters["poet"], "adapter_model.safetensors"))
    # Llama's MLP names where this Mixtral has experts
    renamed = {k.replace("block_sparse_moe.experts.0.w1", "mlp.gate_proj"): v
               for k, v in tensors.items() if "experts.0.w1" in k or "self_attn" in k}
    save_file(renamed, str(other / "adapter_model.safetensors"))
    with _llm(model_dir, enable_lora=True, max_lora_rank=16) as llm:
        with pytest.raises(ValueError, match="trained on base model 'meta-llama/Llama-3.1-8B'"):
            llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=1),
                         lora_request=LoRARequest("llama", 1, str(other)), use_tqdm=False)
        # the engine serves on, and a training path is shown by its last part only
        config["base_model_name_or_path"] = "/home/someone/ckpt/tiny-llama"
        (other / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="trained on base model 'tiny-llama'") as caught:
            llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=1),
                         lora_request=LoRARequest("llama2", 2, str(other)), use_tqdm=False)
        assert "/home/someone" not in str(caught.value)
        out = llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=2),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2


def test_a_model_without_a_tokenizer_warns_at_load(assets, tmp_path, caplog):
    model_dir, _ = assets
    bare = tmp_path / "bare-model"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with caplog.at_level(logging.WARNING, logger="moelora"), _llm(str(bare)) as llm:
        assert llm.get_tokenizer() is None
    assert any("bare-model has no tokenizer" in r.getMessage() for r in caplog.records)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(assets, tmp_path):
    model_dir, _ = assets
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    wrong = tmp_path / "wrong-tokenizer"
    wrong.mkdir()
    words = {f"w{i}": i for i in range(vocab + 100)}
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(str(wrong / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"{vocab + 100} tokens but the model's vocabulary has "
                                         f"{vocab}"):
        _llm(model_dir, tokenizer=str(wrong))
