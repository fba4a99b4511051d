"""Quantized checkpoints: MXFP4 (GPT-OSS experts) and block FP8 experts load as stored (the MoE
kernels read them), everything else quantized is dequantized at load.

The dequantization is checked bit for bit against transformers' own MXFP4 unpacking on random
codes and exponents; then a tiny GPT-OSS checkpoint with its experts quantized to MXFP4 loads
(one process with the experts kept in MXFP4, and each rank's streamed shard dequantized) with
exactly the weights of the same checkpoint dequantized by transformers and saved in bf16, and
generates the same tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, SamplingParams
from moelora.distributed import ParallelConfig
from moelora.distributed.loading import load_shard
from moelora.distributed.shard import shard_model
from moelora.models import load_model
from moelora.models.quantized import dequantize_fp8_blocks
from moelora.models.quantized import dequantize_mxfp4 as dequantize
from moelora.ops import moe as moe_ops
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (3, 40, 5), dtype=torch.uint8, generator=gen)
    ours = dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (3, 160, 40)
    assert torch.equal(ours, theirs)


def test_malformed_pairs_are_refused():
    with pytest.raises(ValueError, match="do not match scales"):
        dequantize(torch.zeros(2, 4, 16, dtype=torch.uint8), torch.zeros(2, 5, dtype=torch.uint8),
                   torch.bfloat16)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 4, 16), torch.zeros(2, 4, dtype=torch.uint8), torch.bfloat16)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] float -> MXFP4 (blocks [E, out, in/32, 16], scales [E, out, in/32]):
    the nearest E2M1 code per element under a per-32-block power-of-two scale."""
    rows = w.transpose(1, 2).float()  # [E, out, in]
    e, out_dim, in_dim = rows.shape
    groups = rows.reshape(e, out_dim, in_dim // 32, 32)
    peak = groups.abs().amax(-1).clamp_min(1e-30)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)  # nearest magnitude
    codes = codes + 8 * (scaled < 0)
    codes = codes.to(torch.uint8).reshape(e, out_dim, in_dim // 32, 16, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def _tiny_checkpoint(family, path):
    """(config.json dict, every tensor) of a tiny random `family` model saved at `path`."""
    make_tiny(family, path)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return json.loads((path / "config.json").read_text()), tensors


def _write_checkpoint(path, config, tensors):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def _dense_experts(params: dict) -> dict:
    """`params` with expert stacks kept as stored (MXFP4 blocks + scales, FP8 + block scales)
    replaced by their dequantized bf16 w13 / w2, so they compare with a dense checkpoint's."""
    out = {}
    for name, value in params.items():
        if name.endswith(("_blocks", "_scale_inv")):
            base = name.rsplit("_", 2 if name.endswith("_scale_inv") else 1)[0]
            if name.endswith("_blocks"):
                assert value.dtype == torch.uint8, name
                out[base] = dequantize(value, params[base + "_scales"],
                                       torch.bfloat16).transpose(1, 2)
            else:
                assert params[base].dtype == torch.float8_e4m3fn, base
                out[base] = torch.stack([dequantize_fp8_blocks(w, s, torch.bfloat16)
                                         for w, s in zip(params[base], value)])
        elif not name.endswith("_scales") and name + "_scale_inv" not in params:
            out[name] = value
    return out


def _parameters(path):
    """The parameters of the model loaded from `path`, MXFP4 blocks as the checkpoint's bytes
    (the loader repacks them into the kernels' tiles) and then dequantized."""
    model = load_model(str(path), dtype=torch.bfloat16, progress=False)
    for module in model.modules():
        if getattr(module, "mxfp4_layout", "checkpoint") == "mma_tiled":
            module.unpack_tiles()
    params = dict(model.named_parameters())
    for name, module in model.named_modules():
        if getattr(module, "mxfp4_layout", "checkpoint") == "mma":
            for leaf in ("w13_blocks", "w2_blocks"):
                params[f"{name}.{leaf}"] = moe_ops.mxfp4_from_mma_layout(params[f"{name}.{leaf}"])
    return _dense_experts(params)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(mxfp4 dir, bf16 dir dequantized by transformers) of one tiny GPT-OSS model."""
    root = tmp_path_factory.mktemp("mxfp4")
    config, tensors = _tiny_checkpoint("gpt_oss", root / "bf16-original")
    quantized, reference = {}, {}
    for name, value in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = _quantize(value)
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            quantized[name] = reference[name] = value
    assert any(k.endswith("_blocks") for k in quantized)
    _write_checkpoint(root / "mxfp4", {**config, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}}, quantized)
    _write_checkpoint(root / "reference", config, reference)
    return str(root / "mxfp4"), str(root / "reference")


def test_mxfp4_checkpoint_loads_as_stored(checkpoints):
    quantized, reference = checkpoints
    model = load_model(quantized, dtype=torch.bfloat16, progress=False)
    assert model.config.expert_format == "mxfp4"
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_blocks.dtype == torch.uint8 and experts.mxfp4_layout == "mma_tiled"
    assert all(w.layout == "mma_tiled" for w in experts.stacks())
    ours, want = _parameters(quantized), _parameters(reference)
    assert ours.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(ours[name], value), name
    prompts = [{"prompt_token_ids": [5, 17, 33, 2, 9]}, {"prompt_token_ids": [7, 7, 1]}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = [[o.outputs[0].token_ids for o in LLM(model=path, device="cpu", dtype="bfloat16")
               .generate(prompts, params, use_tqdm=False)] for path in (quantized, reference)]
    assert tokens[0] == tokens[1]


def test_streamed_shards_of_an_mxfp4_checkpoint(checkpoints):
    quantized, reference = checkpoints
    parallel = ParallelConfig(2, expert_parallel=True)
    for rank in range(2):
        streamed, _ = load_shard(quantized, parallel, rank, torch.bfloat16, torch.device("cpu"))
        cut, _ = shard_model(load_model(reference, dtype=torch.bfloat16, progress=False),
                             parallel, rank)
        got, want = dict(streamed.named_parameters()), dict(cut.named_parameters())
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert math.isfinite(float(got["model.layers.0.mlp.inner.experts.w13"].float().sum()))


# ---- block FP8 (Qwen3-*-FP8 style) ----------------------------------------------------------

def _fp8_blocks(w: torch.Tensor, block: int = 16):
    """[rows, cols] -> (float8_e4m3fn weight, float32 scales [ceil(r/b), ceil(c/b)])."""
    rows, cols = w.shape
    scales = torch.zeros(-(-rows // block), -(-cols // block))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            scale = tile.abs().max().clamp_min(1e-12) / 448.0
            scales[i, j] = scale
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
                tile / scale).to(torch.float8_e4m3fn)
    return q, scales


def test_block_fp8_checkpoint_keeps_experts_as_stored(tmp_path):
    config, tensors = _tiny_checkpoint("qwen3_moe", tmp_path / "original")
    quantized, reference = {}, {}
    for name, value in tensors.items():
        if name.endswith("proj.weight") and "mlp.gate." not in name:  # linear layers, experts
            q, s = _fp8_blocks(value)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            # the reference dequantization, written out element by element
            rows = torch.arange(value.shape[0])[:, None] // 16
            cols = torch.arange(value.shape[1])[None, :] // 16
            reference[name] = (q.float() * s[rows, cols]).to(torch.bfloat16)
        else:
            quantized[name] = reference[name] = value
    _write_checkpoint(tmp_path / "fp8", {**config, "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [16, 16]}}, quantized)
    _write_checkpoint(tmp_path / "reference", config, reference)
    model = load_model(str(tmp_path / "fp8"), dtype=torch.bfloat16, progress=False)
    assert model.config.expert_format == "fp8" and model.config.expert_fp8_block == (16, 16)
    ours, want = _parameters(tmp_path / "fp8"), _parameters(tmp_path / "reference")
    assert ours.keys() == want.keys()
    assert all(torch.equal(ours[n], want[n]) for n in want)
    # an FP8 weight without its block scales is refused, not loaded unscaled
    del quantized[next(k for k in quantized if k.endswith("_scale_inv"))]
    save_file(quantized, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(ValueError, match="without a .*scale_inv"):
        load_model(str(tmp_path / "fp8"), dtype=torch.bfloat16, progress=False)


def test_tensor_and_channel_scaled_fp8_checkpoint(tmp_path):
    config, tensors = _tiny_checkpoint("mixtral", tmp_path / "original")
    quantized, reference = {}, {}
    for index, (name, value) in enumerate(sorted(tensors.items())):
        if name.endswith("proj.weight") and value.dim() == 2:
            per_row = index % 2 == 0  # alternate per-channel and per-tensor scales
            peak = value.float().abs().amax(1, keepdim=True) if per_row else value.float().abs().max()
            scale = (peak / 448.0).clamp_min(1e-12)
            q = (value.float() / scale).to(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale"] = q, scale.reshape(-1, 1) if per_row \
                else scale.reshape(1)
            quantized[name.removesuffix(".weight") + ".input_scale"] = torch.ones(1)
            reference[name] = (q.float() * scale).to(torch.bfloat16)
        else:
            quantized[name] = reference[name] = value
    assert any(k.endswith("_scale") for k in quantized)
    _write_checkpoint(tmp_path / "fp8", config, quantized)
    _write_checkpoint(tmp_path / "reference", config, reference)
    ours, want = _parameters(tmp_path / "fp8"), _parameters(tmp_path / "reference")
    assert all(torch.equal(ours[n], want[n]) for n in want)
