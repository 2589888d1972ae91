"""The toy testbed of docs/toy.md: examples/toy_policy.py builds a model and tokenizer the trainer runs on
``configs/toy_cpu.yaml`` unchanged but for the model's path and the budget."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from cegppo.config import ConfigError, load_config
from cegppo.data import arithmetic_problems, held_out_arithmetic, render_prompt
from cegppo.models import load_model_and_tokenizer
from cegppo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("toy_policy", ROOT / "examples" / "toy_policy.py")
toy = importlib.util.module_from_spec(_spec)
sys.modules["toy_policy"] = toy
_spec.loader.exec_module(toy)

# Small enough to be fast, the config's task otherwise: a held-out set of 8 problems, sampled twice each.
SMALL = ["data.heldout_size=8", "eval.n=2"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("toy")
    toy.main(["--output", str(output), "--max-steps", "2", "--check-every", "1", "--batch-size", "4", *SMALL])
    return output


def test_the_script_saves_a_model_its_tokenizer_and_what_it_measured(toy_dir):
    model, tokenizer = load_model_and_tokenizer(toy_dir)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    summary = json.loads((toy_dir / toy.SUMMARY_FILE).read_text())
    assert summary["sft_steps"] == 2 and 0 <= summary["sft_sampled_accuracy"] <= 1
    assert 0 <= summary["val/heldout/avg@2"] <= 1  # where the RL runs start, as they measure it


def test_the_tokenizer_is_one_token_a_character_and_renders_the_chat(toy_dir):
    _, tokenizer = load_model_and_tokenizer(toy_dir)
    example = arithmetic_problems(1, seed=0, digits=3, few_shot=False)[0]
    prompt = render_prompt(tokenizer, example)
    question = example.messages[-1]["content"]
    assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(question) + len("user\n\nassistant\n") + 3  # three specials, one token each
    assert tokenizer.decode(ids) == prompt
    response = toy.answer(example) + tokenizer.eos_token
    assert tokenizer.decode(tokenizer(response, add_special_tokens=False)["input_ids"]) == response


def test_the_supervised_stage_teaches_the_answer_only(toy_dir):
    _, tokenizer = load_model_and_tokenizer(toy_dir)
    example = held_out_arithmetic(1, digits=3, few_shot=False)[0]
    ids, mask, labels = toy.batch_tensors(tokenizer, [example])
    taught = tokenizer.decode(labels[labels != -100])
    assert taught == f"\\boxed{{{example.ground_truth}}}<|im_end|>" and mask.sum() == ids.shape[1]


def test_the_toy_config_runs_a_step_and_evaluates_the_held_out_set_sampled(toy_dir, tmp_path):
    config = load_config(
        ROOT / "configs" / "toy_cpu.yaml",
        [
            f"model.path={toy_dir}",
            f"trainer.output_dir={tmp_path}",
            "trainer.name=run",
            "trainer.total_steps=1",
            "trainer.eval_every=1",
            "trainer.quiet=true",
            "trainer.tensorboard=false",
            *SMALL,
        ],
    )
    assert config.data.digits == 3 and config.actor.policy_loss.beta1 == 0.5
    trainer = Trainer(config, tmp_path / "run")
    # data.few_shot=false: the bare question, in training and held-out prompts alike
    assert all(len(ex.messages) == 1 for ex in [*trainer.train_data.examples, *trainer.heldout])
    summary = trainer.fit()
    assert summary["steps"] == 1 and summary["heldout_size"] == 8
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= metrics["val/heldout/avg@2"] <= 1


def test_few_shot_and_the_heldout_benchmark_are_checked():
    with pytest.raises(
        ConfigError, match=re.escape("data.few_shot=False is invalid: applies to the arithmetic task")
    ):
        load_config(None, ["data.train_files=x.jsonl", "data.few_shot=false"])
    with pytest.raises(
        ConfigError, match=re.escape("'heldout' is the run's held-out set, and data.heldout is null")
    ):
        load_config(None, ["eval.benchmarks=heldout", "data.heldout=null"])
