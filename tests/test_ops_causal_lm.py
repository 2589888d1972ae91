"""causal_lm_logprobs_and_entropy on tiny Llama and Qwen2 models built from a config (tied and untied)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from cegppo.ops import causal_lm_logprobs_and_entropy, sampler_position_ids

VOCAB = 300
PAD = 0


def tiny_model(family: str, tied: bool) -> torch.nn.Module:
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
        "pad_token_id": PAD,
    }
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.double().eval()


@pytest.fixture(
    params=[("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)],
    ids=lambda p: "-".join(map(str, p)),
)
def model(request):
    family, tied = request.param
    built = tiny_model(family, tied)
    assert (built.get_output_embeddings().weight is built.get_input_embeddings().weight) == tied
    return built


def batch(prompt_lens=(5, 3), response_lens=(4, 2), prompt_width=5, response_width=4, seed=0):
    """Left-padded prompts then right-padded responses, as the sampler hands them over."""
    gen = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for p, r in zip(prompt_lens, response_lens, strict=True):
        prompt = torch.randint(1, VOCAB, (p,), generator=gen)
        response = torch.randint(1, VOCAB, (r,), generator=gen)
        ids = torch.full((prompt_width + response_width,), PAD)
        mask = torch.zeros(prompt_width + response_width, dtype=torch.long)
        ids[prompt_width - p : prompt_width] = prompt
        ids[prompt_width : prompt_width + r] = response
        mask[prompt_width - p : prompt_width + r] = 1
        rows.append(ids)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks), response_width


def naive_full(model, input_ids, attention_mask, response_len, temperature):
    """Full-sequence logits from the model's own forward, then log_softmax / gather / -(p log p).sum."""
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=sampler_position_ids(attention_mask)
    )
    seq_len = input_ids.shape[1]
    logits = out.logits[:, seq_len - response_len - 1 : seq_len - 1] / temperature
    log_probs = logits.log_softmax(-1)
    labels = input_ids[:, seq_len - response_len :]
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def values_and_grads(model, logp, entropy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = (logp * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).sum()
    loss = loss + (entropy * torch.randn(entropy.shape, generator=gen, dtype=entropy.dtype)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return logp.detach(), entropy.detach(), torch.autograd.grad(loss, params)


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_equals_plain_equals_naive(model, temperature):
    input_ids, attention_mask, response_len = batch()
    want = values_and_grads(model, *naive_full(model, input_ids, attention_mask, response_len, temperature))
    for fused in (True, False):
        logp, entropy = causal_lm_logprobs_and_entropy(
            model, input_ids, attention_mask, response_len, temperature=temperature, fused=fused, chunk_size=3
        )
        assert logp.shape == entropy.shape == (2, response_len)
        assert_same(values_and_grads(model, logp, entropy), want)


def test_tied_embedding_gets_both_gradient_paths():
    # With tied weights the embedding gradient is the sum of the input-embedding and LM-head contributions:
    # dropping either (or counting one twice) moves it away from the naive result.
    model = tiny_model("llama", tied=True)
    input_ids, attention_mask, response_len = batch()
    embedding = model.get_input_embeddings().weight
    naive_out = naive_full(model, input_ids, attention_mask, response_len, 1.0)
    (want,) = torch.autograd.grad((naive_out[0] + naive_out[1]).sum(), [embedding])
    logp, entropy = causal_lm_logprobs_and_entropy(model, input_ids, attention_mask, response_len)
    (got,) = torch.autograd.grad((logp + entropy).sum(), [embedding])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # Rows of tokens absent from the input are reached only through the LM head.
    absent = torch.ones(VOCAB, dtype=torch.bool)
    absent[input_ids.flatten()] = False
    assert got[absent].abs().sum(-1).min() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_left_padding_matches_the_unpadded_row(model, fused):
    input_ids, attention_mask, response_len = batch(prompt_lens=(5, 3), response_lens=(4, 2))
    logp, entropy = causal_lm_logprobs_and_entropy(
        model, input_ids, attention_mask, response_len, fused=fused
    )
    for row, (prompt_len, real) in enumerate([(5, 4), (3, 2)]):
        keep = attention_mask[row].bool()
        alone_ids, alone_mask = (
            input_ids[row, keep].unsqueeze(0),
            torch.ones(1, int(keep.sum()), dtype=torch.long),
        )
        alone = causal_lm_logprobs_and_entropy(model, alone_ids, alone_mask, real, fused=fused)
        torch.testing.assert_close(logp[row, :real], alone[0][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(entropy[row, :real], alone[1][0], rtol=1e-9, atol=1e-9)
        assert prompt_len + real == alone_ids.shape[1]


def test_without_entropy():
    model = tiny_model("qwen2", tied=False)
    input_ids, attention_mask, response_len = batch()
    logp, entropy = causal_lm_logprobs_and_entropy(
        model, input_ids, attention_mask, response_len, with_entropy=False
    )
    assert entropy is None
    want = naive_full(model, input_ids, attention_mask, response_len, 1.0)[0]
    torch.testing.assert_close(logp, want, rtol=1e-9, atol=1e-9)


def test_position_ids_follow_the_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert sampler_position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"response_len": 0}, r"response_len must be an int in \[1, 9\).*got 0"),
        ({"response_len": 9}, "got 9"),
        ({"attention_mask": torch.ones(2, 8, dtype=torch.long)}, r"attention_mask has shape \(2, 8\)"),
        ({"temperature": 0.0}, "temperature must be finite and > 0"),
        ({"input_ids": torch.ones(2, 9)}, "integer"),
    ],
)
def test_rejects_bad_input(kwargs, message):
    model = tiny_model("llama", tied=False)
    input_ids, attention_mask, response_len = batch()
    args = {"input_ids": input_ids, "attention_mask": attention_mask, "response_len": response_len, **kwargs}
    with pytest.raises(ValueError, match=message):
        causal_lm_logprobs_and_entropy(model, **args)


def test_fused_refuses_a_head_that_rescales_logits():
    model = tiny_model("llama", tied=False)
    model.config.final_logit_softcapping = 30.0
    input_ids, attention_mask, response_len = batch()
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0.*fused=False"):
        causal_lm_logprobs_and_entropy(model, input_ids, attention_mask, response_len)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_columns_no_row_uses_are_not_run(model, share_prompt, monkeypatch):
    """A micro-batch padded to the step's longest row (extra prompt padding on the left, response padding on the
    right) gives the values and gradients of the tight batch, runs only the tight batch's positions, and scores
    the extra response columns as 0."""
    tight = batch(prompt_lens=(4, 3), response_lens=(3, 2), prompt_width=4, response_width=3)
    wide = batch(prompt_lens=(4, 3), response_lens=(3, 2), prompt_width=7, response_width=9)
    assert torch.equal(wide[0][:, 3:10], tight[0]) and torch.equal(wide[1][:, 3:10], tight[1])
    widths = []
    forward = type(model.model).forward
    monkeypatch.setattr(
        type(model.model),
        "forward",
        lambda self, input_ids=None, **kw: (
            widths.append(input_ids.shape[1]) or forward(self, input_ids, **kw)
        ),
    )
    want = causal_lm_logprobs_and_entropy(model, *tight, share_prompt=share_prompt)
    tight_widths, widths[:] = list(widths), []
    got = causal_lm_logprobs_and_entropy(model, *wide, share_prompt=share_prompt)
    assert widths == tight_widths
    assert_same(
        values_and_grads(model, got[0][:, :3], got[1][:, :3]), values_and_grads(model, want[0], want[1])
    )
    assert not got[0][:, 3:].any() and not got[1][:, 3:].any()
