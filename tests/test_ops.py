"""cegppo.ops kernels against the naive full-logits path, autograd.gradcheck and their input checks."""

from __future__ import annotations

import pytest
import torch

from cegppo.ops import _softmax_chunk, fused_linear, linear_logprobs_and_entropy, logprobs_and_entropy

F64 = torch.float64


def naive(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    log_probs = (logits.double() / temperature).log_softmax(-1)
    logp = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def naive_linear(hidden, weight, labels, bias=None, temperature=1.0):
    logits = hidden @ weight.t()
    return naive(logits if bias is None else logits + bias, labels, temperature)


def make_inputs(shape=(2, 7), hidden_size=6, vocab=29, bias=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    # Distinct per-token weights on both outputs: a plain .sum() would hide a mix-up of the two gradients.
    grad_logp = torch.randn(shape, generator=gen, dtype=F64)
    grad_ent = torch.randn(shape, generator=gen, dtype=F64)
    return hidden, weight, b, labels, grad_logp, grad_ent


def values_and_grads(outputs, params, grad_logp, grad_ent):
    logp, ent = outputs
    loss = (logp.double() * grad_logp).sum() + (ent.double() * grad_ent).sum()
    grads = torch.autograd.grad(loss, [p for p in params if p is not None])
    return logp.detach(), ent.detach(), grads


def assert_close_all(got, want, **tol):
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g.double(), w.double(), **tol)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the elementwise blocks so a chunk is split into several of them even at test sizes."""
    monkeypatch.setattr(_softmax_chunk, "_ELEMENTWISE_BLOCK_BYTES", 3 * 29 * 8)
    monkeypatch.setattr(fused_linear, "_STAGING_BYTES", 5 * 6 * 2)


# chunk sizes: divides N=14, does not divide it, one token, more than N.
@pytest.mark.parametrize("chunk_size", [7, 4, 1, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_naive_float64(chunk_size, temperature, bias):
    hidden, weight, b, labels, g_lp, g_ent = make_inputs(bias=bias)
    params = [hidden, weight, b]
    want = values_and_grads(naive_linear(hidden, weight, labels, b, temperature), params, g_lp, g_ent)
    out = linear_logprobs_and_entropy(
        hidden, weight, labels, bias=b, temperature=temperature, chunk_size=chunk_size
    )
    assert out[0].shape == out[1].shape == labels.shape
    assert out[0].dtype == F64
    assert_close_all(values_and_grads(out, params, g_lp, g_ent), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [7, 4, 64])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_logits_path_matches_naive_float64(chunk_size, temperature):
    _, _, _, labels, g_lp, g_ent = make_inputs()
    logits = torch.randn(*labels.shape, 29, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3
    logits.requires_grad_()
    want = values_and_grads(naive(logits, labels, temperature), [logits], g_lp, g_ent)
    got = values_and_grads(
        logprobs_and_entropy(logits, labels, temperature, chunk_size), [logits], g_lp, g_ent
    )
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


def test_row_blocks_within_a_chunk(small_blocks):
    # 3-row elementwise blocks inside 7-token chunks (and 5-row weight-gradient slices in the half path).
    hidden, weight, b, labels, g_lp, g_ent = make_inputs()
    params = [hidden, weight, b]
    want = values_and_grads(naive_linear(hidden, weight, labels, b, 0.8), params, g_lp, g_ent)
    got = linear_logprobs_and_entropy(hidden, weight, labels, bias=b, temperature=0.8, chunk_size=7)
    assert_close_all(values_and_grads(got, params, g_lp, g_ent), want, rtol=1e-10, atol=1e-10)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    want = values_and_grads(naive(logits, labels, 0.8), [logits], g_lp, g_ent)
    got = values_and_grads(logprobs_and_entropy(logits, labels, 0.8, 7), [logits], g_lp, g_ent)
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("used", [0, 1], ids=["logp", "entropy"])
def test_one_output_alone(used):
    # The other output's gradient reaches backward as None; the kernels must not treat it as zero work.
    hidden, weight, b, labels, g_lp, _ = make_inputs()
    params = [hidden, weight, b]
    want = torch.autograd.grad((naive_linear(hidden, weight, labels, b, 0.9)[used] * g_lp).sum(), params)
    out = linear_logprobs_and_entropy(hidden, weight, labels, bias=b, temperature=0.9, chunk_size=4)
    got = torch.autograd.grad((out[used] * g_lp).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    (want_grad,) = torch.autograd.grad((naive(logits, labels, 0.9)[used] * g_lp).sum(), [logits])
    (got_grad,) = torch.autograd.grad(
        (logprobs_and_entropy(logits, labels, 0.9, 4)[used] * g_lp).sum(), [logits]
    )
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10)


def test_gradcheck_linear():
    hidden, weight, b, labels, _, _ = make_inputs(shape=(5,), hidden_size=3, vocab=7)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: linear_logprobs_and_entropy(h, w, labels, bias=bb, temperature=0.6, chunk_size=2),
        (hidden, weight, b),
    )


def test_gradcheck_logits():
    _, _, _, labels, _, _ = make_inputs(shape=(2, 3), vocab=7)
    logits = torch.randn(2, 3, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: logprobs_and_entropy(z, labels, 1.7, 2), (logits,))


def test_double_backward_is_refused():
    hidden, weight, b, labels, _, _ = make_inputs()
    logp, ent = linear_logprobs_and_entropy(hidden, weight, labels, bias=b)
    (grad,) = torch.autograd.grad((logp + ent).sum(), [hidden], create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        grad.sum().backward()


def test_logits_slice_stays_a_view_and_matches():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, 6, 11, dtype=F64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    g_lp, g_ent = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    want = values_and_grads(naive(full[:, :-1], labels), [full], g_lp, g_ent)
    got = values_and_grads(logprobs_and_entropy(full[:, :-1], labels, chunk_size=2), [full], g_lp, g_ent)
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


def test_nothing_vocab_sized_is_saved_for_backward():
    tokens, vocab = 40, 97
    hidden, weight, b, labels, _, _ = make_inputs(shape=(tokens,), hidden_size=5, vocab=vocab)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_logprobs_and_entropy(hidden, weight, labels, bias=b, chunk_size=8)
    assert saved and max(t.numel() for t in saved) < tokens * vocab
    logits = torch.randn(tokens, vocab, dtype=F64, requires_grad=True)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logprobs_and_entropy(logits, labels, chunk_size=8)
    # Only the caller's own logits (no copy, no softmax) are [N, V]-sized.
    big = [t for t in saved if t.numel() >= tokens * vocab]
    assert [t.data_ptr() for t in big] == [logits.data_ptr()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype, small_blocks):
    hidden, weight, b, labels, g_lp, g_ent = make_inputs(shape=(3, 5), dtype=F64)
    hidden, weight, b = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight, b))
    # Reference: the same half-precision inputs, everything after them in float64.
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want = values_and_grads(naive_linear(*exact[:2], labels, exact[2], 0.9), exact, g_lp, g_ent)
    out = linear_logprobs_and_entropy(hidden, weight, labels, bias=b, temperature=0.9, chunk_size=4)
    assert out[0].dtype == out[1].dtype == torch.float32
    got = values_and_grads(out, [hidden, weight, b], g_lp, g_ent)
    assert [g.dtype for g in got[2]] == [dtype] * 3
    # Logits and logit gradients are rounded to the input dtype once, as an autocast LM head would; the
    # naive path in that dtype lands within about 3 eps of float64 on these inputs.
    eps = torch.finfo(dtype).eps
    for g, w in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
        assert (g.double() - w).abs().max() <= 8 * eps * max(w.abs().max().item(), 1.0)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    got_logits = logprobs_and_entropy(logits, labels, 0.9, 4)
    torch.testing.assert_close(got_logits[0], naive(logits, labels, 0.9)[0].float(), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got_logits[0].sum() + got_logits[1].sum(), [logits])
    assert grad.dtype == dtype


def test_autocast_casts_like_a_linear_layer():
    hidden, weight, _, labels, g_lp, g_ent = make_inputs(shape=(6,), bias=False, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs_and_entropy(hidden, weight, labels, chunk_size=4)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    want = linear_logprobs_and_entropy(*bf16, labels, chunk_size=4)
    torch.testing.assert_close(out[0], want[0])
    got_grads = torch.autograd.grad(
        (out[0] * g_lp.float()).sum() + (out[1] * g_ent.float()).sum(), [hidden, weight]
    )
    want_grads = torch.autograd.grad((want[0] * g_lp.float()).sum() + (want[1] * g_ent.float()).sum(), bf16)
    assert [g.dtype for g in got_grads] == [torch.float32] * 2
    torch.testing.assert_close(got_grads[0], want_grads[0].float())
    # The weight gradient is the same float32 sum, returned unrounded: rounding it gives the bf16 weight's.
    assert torch.equal(got_grads[1].bfloat16(), want_grads[1])
    assert not torch.equal(got_grads[1], want_grads[1].float())


def test_elementwise_blocks_split_chunks_only_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert _softmax_chunk.elementwise_rows(49152, torch.float32, 1024, cpu) == (32 << 20) // (49152 * 4)
    assert _softmax_chunk.elementwise_rows(10, torch.float32, 1024, cpu) == 1024
    assert _softmax_chunk.elementwise_rows(10**9, torch.float64, 1024, cpu) == 1
    assert _softmax_chunk.elementwise_rows(49152, torch.float32, 1024, gpu) == 1024


def test_empty_batch():
    hidden, weight, b, _, _, _ = make_inputs(shape=(0,))
    logp, ent = linear_logprobs_and_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), bias=b)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(weight.grad) == 0


def _linear_call(**overrides):
    hidden, weight, b, labels, _, _ = make_inputs()
    args = {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "bias": b,
        "temperature": 1.0,
        "chunk_size": 4,
    }
    args.update(overrides)
    return linear_logprobs_and_entropy(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labels": torch.zeros(2, 6, dtype=torch.long)}, r"labels has shape \(2, 6\).*\(2, 7\)"),
        ({"labels": torch.zeros(2, 7)}, "integer tensor, got dtype torch.float32"),
        ({"labels": torch.full((2, 7), 29)}, r"\[0, 29\), got values in \[29, 29\]"),
        ({"labels": torch.full((2, 7), -1)}, r"got values in \[-1, -1\]"),
        ({"weight": torch.zeros(29, 5, dtype=F64)}, r"H = hidden.shape\[-1\] = 6, got \(29, 5\)"),
        ({"bias": torch.zeros(30, dtype=F64)}, r"bias must be \[V\] = \[29\].*got \(30,\)"),
        ({"weight": torch.zeros(29, 6)}, "share one dtype.*float32"),
        ({"hidden": torch.zeros(6, dtype=F64)}, r"\[N, H\] or \[B, T, H\], got shape \(6,\)"),
        ({"temperature": 0.0}, "temperature must be finite and > 0, got 0.0"),
        ({"temperature": -1.0}, "got -1.0"),
        ({"temperature": float("nan")}, "got nan"),
        ({"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ({"chunk_size": 2.5}, "got 2.5"),
    ],
)
def test_linear_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        _linear_call(**overrides)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "message"),
    [
        (torch.zeros(4, 9), torch.zeros(5, dtype=torch.long), {}, r"labels has shape \(5,\).*\(4,\)"),
        (torch.zeros(4, 9), torch.full((4,), 9), {}, r"\[0, 9\), got values in \[9, 9\]"),
        (torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, "floating-point"),
        (torch.zeros(9), torch.zeros((), dtype=torch.long), {}, r"got shape \(9,\)"),
        (torch.zeros(4, 9), torch.zeros(4, dtype=torch.long), {"temperature": -2.0}, "got -2.0"),
        (torch.zeros(4, 9), torch.zeros(4, dtype=torch.long), {"chunk_size": -1}, "got -1"),
    ],
)
def test_logits_path_rejects_bad_input(logits, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        logprobs_and_entropy(logits, labels, **kwargs)


def _tempered_inputs(dtype, seed=3):
    """Logits of realistic spread (sd ~ 5) over a vocab big enough for tail mass to matter."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (2.0 * torch.randn(11, 16, generator=gen)).to(dtype).requires_grad_()
    weight = (0.6 * torch.randn(301, 16, generator=gen)).to(dtype).requires_grad_()
    bias = torch.randn(301, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 301, (11,), generator=gen)
    return hidden, weight, bias, labels


def _chunked_head(hidden, weight, bias, chunk_size):
    """The LM head's logits computed chunk by chunk in the inputs' dtype, as the fused kernel computes them."""
    return torch.cat([torch.addmm(bias, h, weight.t()) for h in hidden.split(chunk_size)])


# The sampler's distribution is softmax(logits / T) with the head's logits scaled in full precision; the
# study runs at T = 1.2 and the paper evaluates at 0.6.
@pytest.mark.parametrize("temperature", [0.6, 0.7, 1.0, 1.2])
@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16", "float32"])
def test_linear_exact_at_every_temperature(temperature, mode, small_blocks):
    params = _tempered_inputs(torch.bfloat16 if mode == "bf16" else torch.float32)
    hidden, weight, bias, labels = params
    head_dtype = torch.float32 if mode == "float32" else torch.bfloat16
    with torch.no_grad():
        logits = _chunked_head(*(t.to(head_dtype) for t in (hidden, weight, bias)), chunk_size=4)
    want = naive(logits, labels, temperature)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
        got = linear_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=4
        )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    # Gradients go back in each parameter's own dtype: a float32 head under autocast gets float32 sums.
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), [hidden, weight, bias])
    assert [g.dtype for g in grads] == [t.dtype for t in params[:3]]


@pytest.mark.parametrize("temperature", [0.6, 0.7, 1.0, 1.2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_path_exact_at_every_temperature(temperature, dtype, small_blocks):
    hidden, weight, bias, labels = _tempered_inputs(dtype)
    logits = _chunked_head(hidden, weight, bias, chunk_size=11).detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logprobs_and_entropy(logits, labels, temperature, chunk_size=4)
    want = naive(logits, labels, temperature)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_float32_weight_gradient_under_autocast_is_not_rounded_to_bf16():
    hidden, weight, bias, labels = _tempered_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = linear_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=1.2, chunk_size=3
        )
    grad_weight, grad_bias = torch.autograd.grad(logp.sum() + entropy.sum(), [weight, bias])
    # Four chunks' bf16 partial products summed in float32: a sum rounded to bf16 would have every value on
    # bf16's grid; the float32 sums mostly do not.
    for grad in (grad_weight, grad_bias):
        off_grid = (grad.bfloat16().float() != grad).float().mean().item()
        assert off_grid > 0.5, off_grid
