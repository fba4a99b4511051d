"""The demo's assets, written in Hugging Face formats so the real loaders run on them: a tiny
random Mixtral-architecture checkpoint (per-expert safetensors layout, sharded with an index),
a byte-level tokenizer with a ChatML template, and PEFT LoRA adapters of different ranks
targeting attention and experts. Built once per cache directory; no downloads."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 32, "experts": 8, "top_k": 2,
            "inter": 96}
# (name, rank, targets): attention-only, experts-only, and both.
ADAPTERS = [
    ("poet", 8, ["q_proj", "v_proj", "w1", "w2", "w3"]),
    ("coder", 16, ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
    ("chef", 4, ["w1", "w2", "w3"]),
    ("pirate", 12, ["q_proj", "o_proj"]),
    ("lawyer", 16, ["q_proj", "v_proj", "w1", "w3"]),
]


def build_demo_assets(root: str, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Returns (model directory, {adapter name: adapter directory})."""
    model_dir = os.path.join(root, "tiny-mixtral")
    adapters = {name: os.path.join(root, "adapters", name) for name, _, _ in ADAPTERS}
    done = os.path.join(root, ".complete-v1")
    if os.path.exists(done):
        return model_dir, adapters
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(model_dir, exist_ok=True)
    vocab_size = _write_tokenizer(model_dir)
    _write_model(model_dir, vocab_size, generator)
    for name, rank, targets in ADAPTERS:
        _write_adapter(adapters[name], model_dir, rank, targets, generator)
    open(done, "w").close()
    return model_dir, adapters


def demo_lora_requests(adapter_dirs: dict[str, str]) -> list:
    """One LoRARequest per demo adapter, ids 1, 2, ... in ADAPTERS order."""
    from moelora import LoRARequest

    return [LoRARequest(name, i + 1, adapter_dirs[name]) for i, (name, _, _) in enumerate(ADAPTERS)]


def _write_tokenizer(path: str) -> int:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
                   "add_bos_token": False}, f, indent=1)
    return tok.get_vocab_size()


def _rand(generator, *shape, std=0.05):
    return torch.randn(*shape, generator=generator) * std


def _write_model(path: str, vocab_size: int, generator) -> None:
    t = TINY
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": vocab_size, "hidden_size": t["hidden"],
        "intermediate_size": t["inter"], "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"],
        "head_dim": t["head_dim"], "num_local_experts": t["experts"],
        "num_experts_per_tok": t["top_k"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "eos_token_id": vocab_size - 1, "bos_token_id": vocab_size - 3, "dtype": "float32",
        "sliding_window": None,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    h, d = t["hidden"], t["head_dim"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    shards[0]["model.embed_tokens.weight"] = _rand(generator, vocab_size, h, std=0.5)
    for layer in range(t["layers"]):
        tensors = {}
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
        tensors[p + "self_attn.q_proj.weight"] = _rand(generator, t["heads"] * d, h, std=0.1)
        tensors[p + "self_attn.k_proj.weight"] = _rand(generator, t["kv_heads"] * d, h, std=0.1)
        tensors[p + "self_attn.v_proj.weight"] = _rand(generator, t["kv_heads"] * d, h, std=0.1)
        tensors[p + "self_attn.o_proj.weight"] = _rand(generator, h, t["heads"] * d, std=0.1)
        tensors[p + "block_sparse_moe.gate.weight"] = _rand(generator, t["experts"], h, std=0.2)
        for e in range(t["experts"]):
            q = p + f"block_sparse_moe.experts.{e}."
            tensors[q + "w1.weight"] = _rand(generator, t["inter"], h, std=0.1)
            tensors[q + "w3.weight"] = _rand(generator, t["inter"], h, std=0.1)
            tensors[q + "w2.weight"] = _rand(generator, h, t["inter"], std=0.1)
        shards.append(tensors)
    shards[-1]["model.norm.weight"] = torch.ones(h)
    shards[-1]["lm_head.weight"] = _rand(generator, vocab_size, h, std=0.5)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def _module_shapes(target: str) -> tuple[int, int, bool]:
    """(in, out, per-expert) of a Mixtral module name."""
    t = TINY
    h, d = t["hidden"], t["head_dim"]
    return {
        "q_proj": (h, t["heads"] * d, False), "k_proj": (h, t["kv_heads"] * d, False),
        "v_proj": (h, t["kv_heads"] * d, False), "o_proj": (t["heads"] * d, h, False),
        "w1": (h, t["inter"], True), "w3": (h, t["inter"], True), "w2": (t["inter"], h, True),
    }[target]


def _write_adapter(path: str, model_dir: str, rank: int, targets: list[str], generator) -> None:
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for layer in range(TINY["layers"]):
        for target in targets:
            fan_in, fan_out, per_expert = _module_shapes(target)
            if per_expert:
                prefixes = [f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}."
                            f"{target}" for e in range(TINY["experts"])]
            else:
                prefixes = [f"base_model.model.model.layers.{layer}.self_attn.{target}"]
            for prefix in prefixes:
                tensors[prefix + ".lora_A.weight"] = _rand(generator, rank, fan_in, std=0.3)
                tensors[prefix + ".lora_B.weight"] = _rand(generator, fan_out, rank, std=0.3)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": model_dir, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
