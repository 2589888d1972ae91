"""Shared prompts (``actor.share_prompt``): the same log-probs, entropies, losses, gradients and samples as one
prompt copy per row, with each prompt run once. The plain path is the reference throughout."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from _tiny import tiny_model, tiny_overrides, tiny_tokenizer
from cegppo.config import ConfigError, load_config
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.ops.shared_prompt import DistinctPrompts, common_prefix_length, distinct_prompts, prefill
from cegppo.rollout import HFRolloutEngine, SamplingParams
from cegppo.trainer.actor import Actor, ActorSettings, Experience, UpdateBatch
from test_ops_causal_lm import PAD, VOCAB
from test_ops_causal_lm import tiny_model as config_model

# (prompt length, response lengths of its group): prompts of different lengths, unequal responses, a
# one-token response, and a group whose longest response is shorter than the batch's.
GROUPS = [(7, [5, 2, 1]), (4, [3, 5, 4]), (6, [2, 2, 3])]


def build(family: str, tied: bool, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    return config_model(family, tied).to(dtype).train()


@pytest.fixture(
    params=[("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)],
    ids=lambda p: "-".join(map(str, p)),
)
def model(request):
    return build(*request.param)


def grouped_batch(groups=GROUPS, seed=0, shuffle=True, head=0):
    """Left-padded prompts repeated over their group's rows, right-padded responses; rows shuffled, so the
    groups are found from the tokens, not from the row order. Every prompt begins with the same ``head``
    tokens (a system prompt's part)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randint(1, VOCAB, (head,), generator=gen)
    width = max(p for p, _ in groups)
    response_width = max(max(r) for _, r in groups) + 1  # one all-padding column, as batches can have
    rows, masks = [], []
    for prompt_len, response_lens in groups:
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=gen)
        prompt[:head] = common
        for response_len in response_lens:
            ids = torch.full((width + response_width,), PAD)
            mask = torch.zeros(width + response_width, dtype=torch.long)
            ids[width - prompt_len : width] = prompt
            ids[width : width + response_len] = torch.randint(1, VOCAB, (response_len,), generator=gen)
            mask[width - prompt_len : width + response_len] = 1
            rows.append(ids)
            masks.append(mask)
    ids, mask = torch.stack(rows), torch.stack(masks)
    if shuffle:
        order = torch.randperm(len(ids), generator=gen)
        ids, mask = ids[order], mask[order]
    return ids, mask, response_width


def outputs_and_grads(model, ids, mask, response_len, *, seed=1, **kwargs):
    """Masked log-probs and entropies, and every parameter's gradient of a random mix of both."""
    logp, entropy = causal_lm_logprobs_and_entropy(model, ids, mask, response_len, **kwargs)
    real = mask[:, -response_len:].to(logp.dtype)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(logp.shape, generator=gen, dtype=torch.float64).to(logp.dtype) for _ in range(2)]
    loss = (logp * weights[0] * real).sum() + (entropy * weights[1] * real).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return (logp * real).detach(), (entropy * real).detach(), torch.autograd.grad(loss, params)


def assert_grads_close(got, want, rtol):
    for g, w in zip(got, want, strict=True):
        assert w.norm() > 0
        assert (g - w).norm() <= rtol * w.norm(), ((g - w).norm() / w.norm()).item()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head", [0, 3], ids=["own-prompts", "common-head"])
def test_shared_prompt_equals_one_copy_per_row_float64(model, fused, temperature, head):
    ids, mask, response_len = grouped_batch(head=head)
    assert common_prefix_length(distinct_prompts(ids[:, :7], mask[:, :7])) == head
    kwargs = {"fused": fused, "temperature": temperature, "chunk_size": 5}
    want = outputs_and_grads(model, ids, mask, response_len, **kwargs)
    got = outputs_and_grads(model, ids, mask, response_len, share_prompt=True, **kwargs)
    # HF's RMSNorm and rotary embeddings compute in float32 inside a float64 model: the floor is ~1e-8.
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-9)
    assert_grads_close(got[2], want[2], rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prompt_equals_one_copy_per_row_float32(family):
    model = build(family, tied=False, dtype=torch.float32)
    ids, mask, response_len = grouped_batch(seed=3)
    want = outputs_and_grads(model, ids, mask, response_len)
    got = outputs_and_grads(model, ids, mask, response_len, share_prompt=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert_grads_close(got[2], want[2], rtol=1e-5)


def test_shared_prompt_under_bf16_autocast_is_as_close_as_the_plain_path_is_to_float32():
    model = build("llama", tied=True, dtype=torch.float32)
    ids, mask, response_len = grouped_batch(seed=4)
    exact = outputs_and_grads(model, ids, mask, response_len)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = outputs_and_grads(model, ids, mask, response_len)
        shared = outputs_and_grads(model, ids, mask, response_len, share_prompt=True)
    plain_error = (plain[0] - exact[0]).abs().max()
    assert plain_error > 0  # autocast did act
    assert (shared[0] - exact[0]).abs().max() <= 2 * plain_error
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=4 * plain_error.item())
    for s, p, e in zip(shared[2], plain[2], exact[2], strict=True):
        assert (s - e).norm() <= 2 * (p - e).norm() + 1e-3 * e.norm()


def test_without_entropy_and_padding_past_the_longest_response(model):
    ids, mask, response_len = grouped_batch()
    logp, entropy = causal_lm_logprobs_and_entropy(
        model, ids, mask, response_len, with_entropy=False, share_prompt=True
    )
    assert entropy is None and logp.shape == (len(ids), response_len)
    assert torch.all(logp[:, -1] == 0)  # the all-padding column is not computed
    want = causal_lm_logprobs_and_entropy(model, ids, mask, response_len, with_entropy=False)[0]
    real = mask[:, -response_len:].bool()
    torch.testing.assert_close(logp[real], want[real], rtol=1e-6, atol=1e-9)


def test_each_distinct_prompt_runs_once():
    model = build("qwen2", tied=False)
    widest_prompt, longest_response = max(p for p, _ in GROUPS), max(max(r) for _, r in GROUPS)
    for head, runs in [
        (0, [(len(GROUPS), widest_prompt)]),
        # the shared head once, then each prompt's own tokens, left-padded to the longest
        (2, [(1, 2), (len(GROUPS), widest_prompt - 2)]),
    ]:
        ids, mask, response_len = grouped_batch(head=head)
        tokens: list[torch.Size] = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda m, i, o, tokens=tokens: tokens.append(i[0].shape)
        )
        causal_lm_logprobs_and_entropy(model, ids, mask, response_len, share_prompt=True)
        hook.remove()
        assert tokens == [*runs, (len(ids), longest_response - 1)]


def test_common_prefix_length_leaves_each_prompt_a_token_of_its_own():
    def common(*prompts: list[int]) -> int:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return common_prefix_length(DistinctPrompts(ids, mask, torch.arange(len(prompts))))

    assert common([5, 6, 7, 8], [5, 6, 9]) == 2  # left padding aside: the prompts' own first tokens
    assert common([5, 6, 7, 8], [5, 6, 7]) == 2  # the shorter keeps its last token
    assert common([5, 6, 7], [4, 6, 7]) == 0
    assert common([5, 6, 7]) == 0  # one prompt: nothing to share
    assert common([5, 6, 7, 1], [5, 6, 7, 2], [5, 6, 3, 2]) == 2


def test_distinct_prompts_ignore_padding_ids_and_row_order():
    ids = torch.tensor([[7, 5, 6], [0, 5, 6], [9, 5, 6], [3, 1, 2], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    prompts = distinct_prompts(ids, mask)
    inverse = prompts.inverse.tolist()
    assert inverse[0] == inverse[1] == inverse[2] != inverse[4] != inverse[3]
    assert len(prompts.input_ids) == 3 and prompts.lengths.tolist() == sorted(prompts.lengths.tolist())
    only_short = distinct_prompts(ids[:3], mask[:3])
    assert only_short.input_ids.tolist() == [[5, 6]]  # the padding column no prompt needs is dropped


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_gradient_checkpointing_is_rejected_in_training_mode_and_fine_in_eval_mode():
    model = build("llama", tied=False)
    model.gradient_checkpointing_enable()
    ids, mask, response_len = grouped_batch()
    with pytest.raises(ValueError, match=r"gradient checkpointing.*actor\.share_prompt=false"):
        causal_lm_logprobs_and_entropy(model, ids, mask, response_len, share_prompt=True)
    model.eval()
    with torch.no_grad():
        got = causal_lm_logprobs_and_entropy(model, ids, mask, response_len, share_prompt=True)[0]
        want = causal_lm_logprobs_and_entropy(model, ids, mask, response_len)[0]
    real = mask[:, -response_len:].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match=r"actor\.share_prompt"):
        load_config(None, ["model.gradient_checkpointing=true"])
    load_config(None, ["model.gradient_checkpointing=true", "actor.share_prompt=false"])


# -- the actor ------------------------------------------------------------------------------------------


def experience(groups=GROUPS, vocab=None, seed=0) -> Experience:
    ids, mask, response_len = grouped_batch(groups, seed=seed, shuffle=False)
    if vocab is not None:
        ids = ids % vocab
    gen = torch.Generator().manual_seed(seed)
    rows = len(ids)
    return Experience(
        input_ids=ids,
        attention_mask=mask,
        response_mask=mask[:, -response_len:].float(),
        advantages=torch.randn(rows, generator=gen),
        correct=torch.arange(rows) % 2 == 0,
    )


def actor_settings(share: bool, *extra: str) -> ActorSettings:
    config = load_config(
        None,
        [
            f"actor.share_prompt={share}",
            "rollout.n=3",
            "data.train_batch_size=3",
            "actor.ppo_mini_batch_size=3",
            "actor.bf16_autocast=false",
            "actor.lr=1e-3",
            "actor.entropy_coeff=0.01",
            "actor.positive_loss_coeff=0.1",
            *extra,
        ],
    )
    return ActorSettings.from_config(config)


@pytest.mark.parametrize("micro", [9, 3, 2], ids=["whole-batch", "one-group", "split-groups"])
def test_actor_update_with_shared_prompts_matches_the_plain_update(micro):
    tokenizer = tiny_tokenizer()
    base = tiny_model("qwen2", tokenizer, seed=2).double()
    results = []
    for share in (False, True):
        model = copy.deepcopy(base)
        settings = actor_settings(share, f"actor.micro_batch_size={micro}", "actor.use_kl_loss=true")
        actor = Actor(model, settings, ref_model=tiny_model("qwen2", tokenizer, seed=3).double())
        assert actor.share_prompt is share
        batch = actor.old_policy(experience(vocab=len(tokenizer)), group_size=3, recompute=True)
        metrics = actor.update(batch, group_size=3).metrics
        old = {"old_log_prob": batch.pi_old.log_prob, "old_entropy": batch.pi_old.entropy}
        results.append(
            (
                {**old, "ref_log_prob": batch.ref_log_prob},
                metrics,
                [p.detach().clone() for p in model.parameters()],
            )
        )
    (plain, plain_metrics, plain_weights), (shared, shared_metrics, shared_weights) = results
    real = batch.experience.response_mask.bool()
    for name in ("old_log_prob", "old_entropy", "ref_log_prob"):
        torch.testing.assert_close(shared[name][real], plain[name][real], rtol=1e-5, atol=1e-6)
    for key in (
        "actor/pg_loss",
        "actor/kl_loss",
        "actor/entropy_loss",
        "actor/positive_nll",
        "actor/grad_norm",
    ):
        assert shared_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5, abs=1e-7), key
    for s, p, b in zip(shared_weights, plain_weights, base.parameters(), strict=True):
        assert (s - p).norm() <= 1e-5 * (p - b).norm() + 1e-12


# -- on-policy and bypass_mode: no separate old-log-prob pass -----------------------------------------------------------


def count_policy_passes(actor: Actor) -> list[bool]:
    calls: list[bool] = []
    original = actor.token_log_probs

    def counting(model, batch, *, with_entropy):
        if model is actor.model:
            calls.append(torch.is_grad_enabled())
        return original(model, batch, with_entropy=with_entropy)

    actor.token_log_probs = counting
    return calls


def test_on_policy_update_takes_old_log_probs_from_its_own_forward():
    tokenizer = tiny_tokenizer()
    base = tiny_model("llama", tokenizer, seed=4)
    results = []
    for skip in (False, True):
        model = copy.deepcopy(base)
        actor = Actor(model, actor_settings(True, "actor.micro_batch_size=3"))
        calls = count_policy_passes(actor)
        batch = experience(vocab=len(tokenizer))
        assert actor.pi_old_source(len(batch), group_size=3) == "update"
        batch = actor.old_policy(batch, group_size=3, recompute=not skip)
        assert (batch.pi_old is None) is skip
        update = actor.update(batch, group_size=3)
        metrics = update.metrics
        assert calls == [False] * 3 * (not skip) + [True] * 3  # 3 micro-batches of one group
        results.append((update.policy, metrics, [p.detach() for p in model.parameters()]))
    (passed, passed_metrics, passed_weights), (skipped, skipped_metrics, skipped_weights) = results
    passed = SimpleNamespace(old_log_prob=passed.log_prob, old_entropy=passed.entropy)
    skipped = SimpleNamespace(old_log_prob=skipped.log_prob, old_entropy=skipped.entropy)
    real = batch.experience.response_mask.bool()
    torch.testing.assert_close(skipped.old_log_prob[real], passed.old_log_prob[real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skipped.old_entropy[real], passed.old_entropy[real], rtol=1e-6, atol=1e-6)
    assert skipped_metrics["actor/ppo_kl"] == pytest.approx(passed_metrics["actor/ppo_kl"], abs=1e-6)
    for s, p in zip(skipped_weights, passed_weights, strict=True):
        torch.testing.assert_close(s, p, rtol=1e-5, atol=1e-7)


def test_off_policy_update_needs_the_old_log_prob_pass():
    tokenizer = tiny_tokenizer()
    # Clip-Cov selection and rollout correction read π_old of the whole (mini-)batch before the forward pass
    extras = (
        ["actor.ppo_epochs=2"],
        ["actor.ppo_mini_batch_size=1"],
        ["actor.policy_loss=clip_cov"],
        ["algorithm.rollout_correction.rollout_is=token"],
        ["actor.top_entropy_quantile=0.2"],
    )
    for extra in extras:
        actor = Actor(tiny_model("llama", tokenizer), actor_settings(True, *extra))
        batch = experience(vocab=len(tokenizer))
        assert actor.pi_old_source(len(batch), group_size=3) == "recomputed"
        with pytest.raises(
            ValueError, match=r"π_old must be computed before this update \(Actor.old_policy\)"
        ):
            actor.update(UpdateBatch(batch, None), group_size=3)


def test_a_skipped_on_policy_step_still_reports_old_log_probs(monkeypatch):
    tokenizer = tiny_tokenizer()
    actor = Actor(tiny_model("llama", tokenizer), actor_settings(True))
    batch = actor.old_policy(experience(vocab=len(tokenizer)), group_size=3)
    monkeypatch.setattr(
        actor.policy_gradient, "loss_fn", lambda **kw: (kw["log_prob"].sum() * float("nan"), {})
    )
    update = actor.update(batch, group_size=3)
    metrics = update.metrics
    assert metrics["actor/skipped_updates"] == 1
    assert update.policy.log_prob is not None and update.policy.entropy is not None


def with_sampler_log_probs(batch: Experience, actor: Actor) -> Experience:
    """``batch`` with sampler log-probs a little off the policy's, as another engine's would be."""
    with torch.no_grad():
        log_prob = actor.token_log_probs(actor.model, batch, with_entropy=False)[0]
    noise = 0.05 * torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(7))
    batch.sampler_log_prob = (log_prob + noise).detach()
    return batch


@pytest.mark.parametrize("kl", [False, True], ids=["no-kl", "kl"])
def test_bypass_mode_takes_old_log_probs_from_the_update_over_several_steps(kl):
    """bypass_mode's π_old is the sampler's: with three mini-batches and two epochs the update runs no
    no-grad policy pass, takes the same steps, logs the same metrics, and reports each mini-batch's log-probs
    and entropies at the weights it was first trained with."""
    tokenizer = tiny_tokenizer()
    base = tiny_model("llama", tokenizer, seed=4)
    reference = tiny_model("llama", tokenizer, seed=5)
    extra = ["actor.policy_loss=bypass_mode", "actor.micro_batch_size=3", "actor.ppo_mini_batch_size=1"]
    extra += ["actor.ppo_epochs=2", "actor.lr=0.02", f"actor.use_kl_loss={kl}"]
    results = []
    for skip in (False, True):
        model = copy.deepcopy(base)
        actor = Actor(model, actor_settings(True, *extra), ref_model=reference)
        batch = with_sampler_log_probs(experience(vocab=len(tokenizer)), actor)
        log_probs, step = actor.token_log_probs, actor._update_mini_batch
        calls = count_policy_passes(actor)
        at_first_visit: list[tuple[torch.Tensor, torch.Tensor]] = []

        def recording(mini, step=step, log_probs=log_probs, model=model, seen=at_first_visit, **kw):
            if len(seen) < 3:  # the first epoch: each mini-batch at the weights the update reaches it with
                with torch.no_grad():
                    seen.append(log_probs(model, mini.experience, with_entropy=True))
            return step(mini, **kw)

        actor._update_mini_batch = recording
        assert actor.pi_old_source(len(batch), group_size=3) == "sampler"
        # the pass bypass_mode ran before it took its metrics' old log-probs from the update
        recomputed = None if skip else actor.recompute_pi_old(batch)
        batch = actor.old_policy(batch, group_size=3)
        assert (batch.ref_log_prob is not None) is kl
        update = actor.update(batch, group_size=3)
        metrics = update.metrics
        passes = calls[: calls.index(True)]  # before the update's first forward with gradients
        assert passes == [False] * 3 * (not skip)  # 3 micro-batches of one group each
        assert calls.count(True) == 6  # 3 mini-batches x 2 epochs, one micro-batch each
        policy = recomputed or update.policy
        policy = SimpleNamespace(old_log_prob=policy.log_prob, old_entropy=policy.entropy)
        results.append((policy, metrics, [p.detach() for p in model.parameters()], at_first_visit))
    (passed, passed_metrics, passed_weights, _), (skipped, skipped_metrics, skipped_weights, seen) = results
    for s, p in zip(skipped_weights, passed_weights, strict=True):
        torch.testing.assert_close(s, p, rtol=1e-6, atol=1e-7)
    assert skipped_metrics.keys() == passed_metrics.keys()
    for key, value in passed_metrics.items():
        assert skipped_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert skipped_metrics["quadrant/PA&LP/frac"] > 0 and passed_metrics["actor/num_updates"] == 6
    real = batch.experience.response_mask.bool()
    expected_log_prob = torch.cat([log_prob for log_prob, _ in seen])
    expected_entropy = torch.cat([entropy for _, entropy in seen])
    torch.testing.assert_close(skipped.old_log_prob[real], expected_log_prob[real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skipped.old_entropy[real], expected_entropy[real], rtol=1e-6, atol=1e-6)
    first = real[:3]  # the first mini-batch is trained at π_old itself: the pass's values
    torch.testing.assert_close(skipped.old_log_prob[:3][first], passed.old_log_prob[:3][first])
    torch.testing.assert_close(skipped.old_entropy[:3][first], passed.old_entropy[:3][first])
    assert not torch.allclose(skipped.old_log_prob[3:][real[3:]], passed.old_log_prob[3:][real[3:]])


def test_a_bypass_update_with_a_skipped_step_reports_the_log_probs_each_step_met(monkeypatch):
    tokenizer = tiny_tokenizer()
    extra = ("actor.policy_loss=bypass_mode", "actor.ppo_mini_batch_size=1", "actor.lr=0.02")
    actor = Actor(tiny_model("llama", tokenizer, seed=4), actor_settings(True, *extra))
    batch = actor.old_policy(with_sampler_log_probs(experience(vocab=len(tokenizer)), actor), group_size=3)
    step, loss_fn, met, losses = actor._update_mini_batch, actor.policy_gradient.loss_fn, [], []

    def recording(mini, **kw):
        with torch.no_grad():
            met.append(actor.token_log_probs(actor.model, mini.experience, with_entropy=False)[0])
        return step(mini, **kw)

    def nan_in_the_second_mini_batch(**kwargs):  # one micro-batch per mini-batch
        loss, metrics = loss_fn(**kwargs)
        losses.append(loss)
        return (loss * float("nan"), metrics) if len(losses) == 2 else (loss, metrics)

    monkeypatch.setattr(actor, "_update_mini_batch", recording)
    monkeypatch.setattr(actor.policy_gradient, "loss_fn", nan_in_the_second_mini_batch)
    update = actor.update(batch, group_size=3)
    metrics = update.metrics
    assert metrics["actor/skipped_updates"] == 1 and metrics["actor/num_updates"] == 3
    real = batch.experience.response_mask.bool()
    torch.testing.assert_close(update.policy.log_prob[real], torch.cat(met)[real], rtol=1e-6, atol=1e-6)
    assert update.policy.entropy is not None


# -- generation -----------------------------------------------------------------------------------------

QUESTIONS = ["What is 1 + 2?", "What is 12 + 30? Think step by step, then answer.", "Hi", "What is 7 + 8?"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=0.0, max_new_tokens=10),
        SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=5),
        SamplingParams(n=4, temperature=0.8, top_k=6, top_p=0.9, max_new_tokens=10, seed=6),
    ],
    ids=["greedy", "sampled", "filtered"],
)
@pytest.mark.parametrize("batch_size", [None, 5], ids=["one-call", "groups-split"])
def test_shared_prefill_generates_the_same_tokens_and_logprobs(arch, params, batch_size):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    plain, shared = (
        HFRolloutEngine(model, tokenizer, batch_size=batch_size, share_prompt=share).generate(prompts, params)
        for share in (False, True)
    )
    # Observed on float32 CPU: the same tokens, log-probs within 1e-6; a draw at a rounding boundary
    # could differ in principle, as with any change of batch shape.
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    torch.testing.assert_close(shared.sampler_logprobs, plain.sampler_logprobs, rtol=0, atol=1e-5)


def test_shared_prefill_runs_each_prompt_once(tiny_llama, tiny_tokenizer):
    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    encoded = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, encoded))
    common = next(i for i, column in enumerate(zip(*encoded, strict=False)) if len(set(column)) > 1)
    assert common > 0  # the chat template's first tokens
    tokens = []
    hook = tiny_llama.get_input_embeddings().register_forward_hook(lambda m, i, o: tokens.append(i[0].shape))
    try:
        HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(prompts, SamplingParams(n=8, max_new_tokens=3))
    finally:
        hook.remove()
    assert tokens[0] == (1, common)  # the tokens every prompt begins with, once
    assert tokens[1] == (len(prompts), width - 1 - common)  # then each prompt's own, all but the last token
    assert tokens[2] == (len(prompts) * 8, 1)  # generate's first step: each row's last prompt token


# -- the trainer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mini_batch", [4, 2], ids=["on-policy", "two-updates"])
def test_a_trainer_step_is_the_same_with_and_without_sharing(tiny_model_dir, tmp_path, mini_batch):
    from cegppo.trainer import Trainer

    records = []
    for share in (False, True):
        overrides = tiny_overrides(
            tiny_model_dir,
            tmp_path / str(share),
            **{
                "data.heldout": "null",
                "actor.share_prompt": share,
                "actor.ppo_mini_batch_size": mini_batch,
                "actor.micro_batch_size": 6,  # groups of 4 split across micro-batches
            },
        )
        trainer = Trainer(load_config(None, overrides), tmp_path / str(share) / "run")
        assert trainer.engine.share_prompt is share
        calls = count_policy_passes(trainer.actor)
        records.append(trainer.step())
        trainer.close()
        # on-policy, no separate no-grad pass over the policy: 16 rows in micro-batches of 6
        assert calls.count(False) == (0 if mini_batch == 4 else 3)
    plain, shared = records
    for key, value in plain.items():
        if not key.startswith(("timing/", "perf/")):
            assert shared[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_bypass_mode_trainer_step_runs_no_old_log_prob_pass(tiny_model_dir, tmp_path):
    from cegppo.trainer import Trainer

    overrides = tiny_overrides(
        tiny_model_dir, tmp_path, **{"data.heldout": "null", "actor.policy_loss": "bypass_mode"}
    )  # two mini-batches of two groups
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    calls = count_policy_passes(trainer.actor)
    metrics = trainer.step()
    trainer.close()
    assert calls == [True] * 4  # 16 rows in micro-batches of 4, each trained once
    assert metrics["actor/num_updates"] == 2
    # from the update's forward passes: the entropies and the trainer/sampler gap (the HF engine's is ~0)
    assert 0 < metrics["entropy/mean"] < math.log(trainer.model.config.vocab_size)
    assert 0 <= metrics["rollout/logprob_diff"] < 0.1


def test_prefill_fills_the_cache_it_is_given_and_refuses_a_used_one(tiny_llama, tiny_tokenizer):
    from transformers import DynamicCache

    ids = tiny_tokenizer(["hello there"], return_tensors="pt").input_ids
    given = DynamicCache(config=tiny_llama.config)
    cache, _ = prefill(tiny_llama, ids, torch.ones_like(ids), cache=given)
    assert cache is given and cache.get_seq_length() == ids.shape[1]
    with pytest.raises(ValueError, match=f"empty cache, got one holding {ids.shape[1]} tokens"):
        prefill(tiny_llama, ids, torch.ones_like(ids), cache=given)
