"""The decoder layer built on the layer ops: the fused QKV weight loads from per-projection
checkpoint tensors in place (and fails by name), the carried residual stream with fused add +
norm equals the plain HF stack, and sharding keeps whole heads of the fused projection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny
from moelora.models import ReferenceContext, load_model
from moelora.models.synthetic import build_synthetic


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint (q/k/v biases, GQA) saved by transformers."""
    path = tmp_path_factory.mktemp("qwen2_moe")
    hf_model, _ = hf_tiny.make_tiny("qwen2_moe", path)
    return path, hf_model


def _checkpoint(path):
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_qkv_rows_hold_each_checkpoint_projection(qwen2_dir):
    path, _ = qwen2_dir
    model = load_model(path, dtype=torch.float32, progress=False)
    tensors = _checkpoint(path)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        weights = [tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        biases = [tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] for p in "qkv"]
        assert torch.equal(attn.qkv_proj.weight, torch.cat(weights))
        assert torch.equal(attn.qkv_proj.bias, torch.cat(biases))
        assert torch.equal(attn.k_proj.weight, weights[1])  # the views name the rows
        assert attn.v_proj.weight.data_ptr() == \
            attn.qkv_proj.weight[weights[0].shape[0] + weights[1].shape[0]:].data_ptr()
    names = {name for name, _ in model.named_parameters()}
    assert not any(part in name for name in names for part in (".q_proj.", ".k_proj.", ".v_proj."))
    # no second copy: the model holds exactly as many elements as the checkpoint
    checkpoint_elems = sum(t.numel() for name, t in tensors.items())
    assert sum(p.numel() for p in model.parameters()) == checkpoint_elems


def _resave(path, tmp_path, edit):
    """A copy of the checkpoint at `path` with `edit` applied to its tensor dict."""
    tensors = _checkpoint(path)
    edit(tensors)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((Path(path) / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_a_missing_projection_is_named(qwen2_dir, tmp_path):
    path, _ = qwen2_dir
    broken = _resave(path, tmp_path,
                     lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(broken, dtype=torch.float32, progress=False)


def test_a_misshapen_projection_is_named(qwen2_dir, tmp_path):
    path, _ = qwen2_dir

    def shrink(t):
        name = "model.layers.0.self_attn.v_proj.bias"
        t[name] = t[name][:-1].clone()

    broken = _resave(path, tmp_path, shrink)
    with pytest.raises(ValueError, match=r"v_proj\.bias' has shape \(31,\), expected \(32,\)"):
        load_model(broken, dtype=torch.float32, progress=False)


def _plain_forward(model, ids, positions):
    """The HF stack in plain torch (unfused residual adds, torch RMSNorm and rope) over the same
    weights, with ReferenceContext attention; the definition the fused path must equal."""
    c = model.config

    def norm(x, module):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
        if module.weight.dtype == torch.float32 and x.dtype != torch.float32:
            return (module.weight * h).to(x.dtype)
        return module.weight * h.to(x.dtype)

    inv_freq = model.rotary.inv_freq
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * model.rotary.attention_scaling).to(model.lm_head_matrix.dtype)[:, None]
    sin = (emb.sin() * model.rotary.attention_scaling).to(model.lm_head_matrix.dtype)[:, None]

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    ctx = ReferenceContext()
    ctx.begin_step(torch.zeros_like(positions), positions)
    h = model.model.embed_tokens(ids)
    t = ids.shape[0]
    for layer in model.model.layers:
        attn = layer.self_attn
        x = norm(h, layer.input_layernorm)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(t, c.num_heads, c.head_dim)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(t, c.num_kv_heads, -1)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(t, c.num_kv_heads, -1)
        if attn.qk_norm == "head":
            q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
        o = ctx.attention(layer.self_attn.layer, rotate(q), rotate(k), v, scale=attn.scale,
                          sliding_window=attn.sliding_window, sinks=attn.sinks)
        h = h + attn.o_proj(o.reshape(t, -1))
        h = h + layer.mlp(norm(h, layer.post_attention_layernorm), ctx)
    return norm(h, model.model.norm)


class _Passthrough(torch.nn.Module):
    """An MLP stand-in (bf16 runs: a router's near-ties would flip experts on rounding)."""

    def forward(self, x, ctx):
        return x


@torch.inference_mode()
@pytest.mark.parametrize("dtype,attention_only", [(torch.float32, False),
                                                  (torch.bfloat16, True)])
def test_fused_stack_equals_the_plain_stack(dtype, attention_only):
    """Residual carried through the layers, adds fused into the norms, rope and Qwen3's head
    norm fused into the attention context: the plain HF stack within rounding."""
    model = build_synthetic("tiny-moe", dtype=dtype, num_layers=3, seed=3)
    if attention_only:
        for layer in model.model.layers:
            layer.mlp = _Passthrough()
    with torch.no_grad():  # norms that are not all ones, so a weight mix-up shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ids = torch.tensor([1, 5, 9, 13, 2, 7, 200])
    positions = torch.arange(7)
    ctx = ReferenceContext()
    ctx.begin_step(torch.zeros_like(positions), positions)
    ours = model(ids, positions, ctx)
    ref = _plain_forward(model, ids, positions)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol,
                               atol=tol * ref.float().abs().max().item())
