"""vLLM's presence/frequency/repetition penalties and logit_bias: the math on a hand-made row,
greedy tokens against transformers' repetition penalty on a tiny model, and validation."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, SamplingParams
from moelora.engine.sampler import SampleRequest, adjust_logits, sample


def _request(params, prompt=(), output=()):
    return SampleRequest(params, None, (), list(prompt), list(output))


def test_penalties_and_bias_follow_vllm_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25,
                            repetition_penalty=2.0, logit_bias={4: 10.0})
    got = adjust_logits(logits, _request(params, prompt=[0, 1], output=[3, 3, 1]))
    want = logits.clone()
    want[4] += 10.0                                    # bias
    for t in (0, 1, 3):                                # seen in prompt or output: repetition
        want[t] = want[t] / 2.0 if want[t] > 0 else want[t] * 2.0
    want[3] -= 0.25 * 2 + 0.5                          # output twice: frequency x2 + presence
    want[1] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(got, want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # input untouched
    # the bias decides a greedy row; the logprob reported is the model's (unadjusted) one
    result = sample(logits[None], [_request(params, prompt=[0, 1], output=[3, 3, 1])])
    assert result.token_ids == [4]
    assert result.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[4]))


@pytest.mark.parametrize("bad,match", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {3: 101}}, "logit_bias"),
])
def test_invalid_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_repetition_penalty_matches_transformers(tmp_path):
    hf_model, _ = make_tiny("qwen3_moe", tmp_path / "model")
    llm = LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (4, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)
    changed = 0
    for prompt, out, base in zip(prompts, outs, plain):
        with torch.no_grad():
            theirs = hf_model.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                dtype=torch.long), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                repetition_penalty=1.8, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == theirs
        changed += theirs != base.outputs[0].token_ids
    assert changed >= 1, "the penalty should change some greedy continuation"


def test_logit_bias_outside_the_vocabulary_is_refused(tmp_path):
    make_tiny("llama", tmp_path / "model")
    llm = LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="logit_bias token id"):
        llm.generate([{"prompt_token_ids": [3, 4]}], SamplingParams(logit_bias={10 ** 6: 1.0}),
                     use_tqdm=False)
