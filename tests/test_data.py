"""Tests for cegppo.data: prompt files, benchmarks, the arithmetic task, rendering and PromptDataset."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from cegppo.data import (
    ARITHMETIC_FEW_SHOT,
    BOXED_INSTRUCTION,
    PromptDataset,
    PromptExample,
    arithmetic_problems,
    few_shot_messages,
    list_benchmarks,
    load_benchmark,
    load_prompt_file,
    render_prompt,
)

SIMPLE_ROWS = [
    {"problem": "What is 1 + 1?", "answer": "2", "id": "p0"},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "data_source": "mine", "level": 3},
    {"problem": "How many legs has a spider?", "answer": "8"},
]
VERL_ROWS = [
    {
        "data_source": "math_longcot_math_verify",
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "reward_model": {"style": "rule", "ground_truth": "5"},
        "extra_info": {"index": 0, "split": "train"},
    },
    {
        "data_source": "math_longcot_math_verify",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 + 4?"}],
        "reward_model": {"style": "rule", "ground_truth": "8"},
        "extra_info": {"index": 1, "split": "train"},
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list) -> Path:
    # Parquet columns are rectangular: a key missing from a row is stored as null.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in keys} for row in rows]), path)
    return path


# ---------------------------------------------------------------- prompt files


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json-array"])
def test_simple_schema(tmp_path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "set.jsonl", SIMPLE_ROWS)
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "set.parquet", SIMPLE_ROWS)
    else:
        path = tmp_path / "set.json"
        path.write_text(json.dumps(SIMPLE_ROWS, indent=1))
    examples = load_prompt_file(path)
    assert [ex.ground_truth for ex in examples] == ["2", "\\frac{1}{2}", "8"]
    assert examples[0].messages == [{"role": "user", "content": "What is 1 + 1?"}]
    assert [ex.data_source for ex in examples] == ["set", "mine", "set"]
    assert examples[0].extra_info["id"] == "p0"
    assert examples[1].extra_info["level"] == 3
    assert "level" not in examples[0].extra_info  # a null Parquet cell is an absent key


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_numeric_answers_become_strings(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"problem": "p", "answer": value} for value in (8.0, 27.0, 0.5)
    ]  # amc23's raw answers were floats
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    examples = load_prompt_file(writer(tmp_path / f"nums.{fmt}", rows))
    assert [ex.ground_truth for ex in examples] == ["8", "27", "0.5"]
    path = write_jsonl(tmp_path / "ints.jsonl", [{"problem": "p", "answer": 12}])
    assert load_prompt_file(path)[0].ground_truth == "12"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_verl_schema(tmp_path: Path, fmt: str) -> None:
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    path = writer(tmp_path / f"train.{fmt}", VERL_ROWS)
    examples = load_prompt_file(path)
    assert [ex.ground_truth for ex in examples] == ["5", "8"]
    assert examples[0].data_source == "math_longcot_math_verify"
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].extra_info == {"index": 1, "split": "train"}


def test_mixed_schemas_system_prompt_few_shot_and_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [SIMPLE_ROWS[0], VERL_ROWS[1]])
    shots = [{"question": "What is 3 + 4?", "answer": "\\boxed{7}"}]
    examples = load_prompt_file(
        path, system_prompt="You add numbers.", few_shot=shots, question_template=BOXED_INSTRUCTION
    )
    expected_tail = [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "\\boxed{7}"},
    ]
    for ex, question in zip(examples, ["What is 1 + 1?", "What is 4 + 4?"], strict=True):
        assert ex.messages[0] == {"role": "system", "content": "You add numbers."}  # replaces "Be brief."
        assert ex.messages[1:3] == expected_tail
        assert ex.question == BOXED_INSTRUCTION.replace("{problem}", question)
        assert ex.question.endswith("within \\boxed{}.")
        assert len(ex.messages) == 4


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"problem": "a", "answer": "1"}', '{"problem": "b"}'], r"bad\.jsonl:2: missing key 'answer'"),
        (
            ['{"problem": "a", "answer": "1"}', "", '{"problem": "b", "answer": 2'],
            r"bad\.jsonl:3: invalid JSON",
        ),
        (['{"answer": "1"}'], r"bad\.jsonl:1: missing key 'problem'"),
        (['{"problem": ["a"], "answer": "1"}'], r"bad\.jsonl:1: problem: expected a string, got list"),
        (['{"problem": "a", "answer": [1]}'], r"bad\.jsonl:1: answer: expected the gold answer .* got list"),
        (['{"problem": "a", "answer": " "}'], r"bad\.jsonl:1: answer: the gold answer is empty"),
        (
            ['{"problem": "a", "answer": "1", "data_source": 3}'],
            r"bad\.jsonl:1: data_source: expected a string",
        ),
        (["[1, 2]"], r"bad\.jsonl:1: expected an object"),
        (['{"prompt": [{"role": "user", "content": "q"}]}'], r"bad\.jsonl:1: missing key 'reward_model'"),
        (
            ['{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}'],
            r"bad\.jsonl:1: reward_model: missing key 'ground_truth'",
        ),
        (
            ['{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}'],
            r"bad\.jsonl:1: prompt\[0\]: missing key 'content'",
        ),
        (
            ['{"prompt": [{"role": "bot", "content": "q"}], "reward_model": {"ground_truth": "1"}}'],
            r"bad\.jsonl:1: prompt\[0\]\.role: 'bot' is not one of",
        ),
        (
            ['{"prompt": [{"role": "assistant", "content": "q"}], "reward_model": {"ground_truth": "1"}}'],
            r"bad\.jsonl:1: prompt must end with a user turn",
        ),
        ([""], r"bad\.jsonl: no prompts"),
        (
            ['{"problem": "q", "answer": "1"}', '{"problem": "", "answer": "2"}'],
            r"bad\.jsonl:2: the question .* is empty",
        ),
        (
            ['{"prompt": [{"role": "user", "content": "  "}], "reward_model": {"ground_truth": "1"}}'],
            r"bad\.jsonl:1: the question \(the final user turn\) is empty",
        ),
    ],
)
def test_bad_rows_name_file_line_and_key(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_prompt_file(path)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 50"):
        load_prompt_file(path)


def test_bad_parquet_row_names_row_number(tmp_path: Path) -> None:
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: missing key 'answer'"):
        load_prompt_file(path)


def test_bad_files_and_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_prompt_file(tmp_path / "nope.jsonl")
    csv = tmp_path / "set.csv"
    csv.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"unsupported prompt file type '\.csv'"):
        load_prompt_file(csv)
    path = write_jsonl(tmp_path / "ok.jsonl", SIMPLE_ROWS)
    with pytest.raises(ValueError, match="question_template"):
        load_prompt_file(path, question_template="no placeholder")
    with pytest.raises(ValueError, match=r"few_shot\[0\]: missing key 'answer'"):
        load_prompt_file(path, few_shot=[{"question": "q"}])


def test_few_shot_specs() -> None:
    pairs = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    turns = few_shot_messages(pairs)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert few_shot_messages(turns) == turns
    assert few_shot_messages(None) == [] and few_shot_messages([]) == []
    with pytest.raises(ValueError, match=r"few_shot\[1\]\.role: expected 'assistant'"):
        few_shot_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="last turn must be an assistant"):
        few_shot_messages(turns[:3])
    with pytest.raises(ValueError, match="expected a list"):
        few_shot_messages("q: 1")


# ---------------------------------------------------------------- arithmetic and benchmarks


def test_arithmetic_is_deterministic_and_prefix_stable() -> None:
    first = arithmetic_problems(50, seed=3)
    again = arithmetic_problems(50, seed=3)
    assert first == again
    assert arithmetic_problems(20, seed=3) == first[:20]
    assert [ex.question for ex in arithmetic_problems(50, seed=4)] != [ex.question for ex in first]
    pairs = {(ex.extra_info["a"], ex.extra_info["b"]) for ex in first}
    assert len(pairs) == 50  # distinct
    for ex in first:
        a, b = ex.extra_info["a"], ex.extra_info["b"]
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert ex.ground_truth == str(a + b)
        assert ex.question == f"What is {a} + {b}? Put the final answer in \\boxed{{}}."
        assert ex.data_source == "arithmetic"
        assert ex.messages[:-1] == few_shot_messages(ARITHMETIC_FEW_SHOT)


def test_arithmetic_train_and_held_out_are_disjoint() -> None:
    held_out = load_benchmark("arithmetic")
    assert len(held_out) == 200
    unordered = {tuple(sorted((ex.extra_info["a"], ex.extra_info["b"]))) for ex in held_out}
    train = arithmetic_problems(7000, seed=0)  # nearly the whole training pool
    for ex in train:
        assert tuple(sorted((ex.extra_info["a"], ex.extra_info["b"]))) not in unordered
    shots = {(12, 35), (27, 58)}
    assert not shots & {tuple(sorted((ex.extra_info["a"], ex.extra_info["b"]))) for ex in train + held_out}
    assert load_benchmark("arithmetic") == held_out


def test_arithmetic_options() -> None:
    plain = arithmetic_problems(5, seed=1, few_shot=False)
    assert all(len(ex.messages) == 1 for ex in plain)
    excluded = [(ex.extra_info["b"], ex.extra_info["a"]) for ex in plain]  # reversed order is excluded too
    rest = arithmetic_problems(100, seed=1, exclude=excluded)
    assert not {(ex.extra_info["a"], ex.extra_info["b"]) for ex in rest} & {
        tuple(reversed(p)) for p in excluded
    }
    one_digit = arithmetic_problems(10, seed=0, digits=1)
    assert all(1 <= ex.extra_info["a"] <= 9 for ex in one_digit)
    with pytest.raises(ValueError, match=r"only \d+ are available"):
        arithmetic_problems(10_000, seed=0)
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems(1, seed=0, split="valid")  # type: ignore[arg-type]


def test_every_benchmark_loads() -> None:
    names = list_benchmarks()
    assert names == ["aime24", "aime25", "amc23", "arithmetic", "gsm8k", "math500"]
    sizes = {"aime24": 30, "aime25": 30, "amc23": 40, "arithmetic": 200, "gsm8k": 1319, "math500": 500}
    for name in names:
        examples = load_benchmark(name)
        assert len(examples) == sizes[name]
        assert all(ex.ground_truth.strip() and ex.question.strip() for ex in examples)
        assert all(ex.data_source == name for ex in examples)
    with pytest.raises(ValueError, match="unknown benchmark 'aime23'"):
        load_benchmark("aime23")


def test_benchmark_with_template_and_system_prompt() -> None:
    example = load_benchmark("aime24", question_template=BOXED_INSTRUCTION, system_prompt="")[0]
    assert example.messages[0] == {"role": "system", "content": ""}
    assert example.question.startswith("Find the largest possible real part")
    assert example.question.endswith("\\boxed{}.")
    assert example.ground_truth == "540"


# ---------------------------------------------------------------- render_prompt

SMOLLM_TEMPLATE = (  # SmolLM2-135M-Instruct's template (from its GGUF): a default system turn when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_render_prompt_with_chatml(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    example = arithmetic_problems(1, seed=0)[0]
    text = render_prompt(tiny_tokenizer, example)
    a, b = example.extra_info["a"], example.extra_info["b"]
    assert text.startswith("<|im_start|>user\nWhat is 12 + 35?")
    assert "<|im_start|>assistant\n12 + 35 = 47. The answer is \\boxed{47}.<|im_end|>\n" in text
    assert text.endswith(
        f"What is {a} + {b}? Put the final answer in \\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = render_prompt(tiny_tokenizer, example, system_prompt="Add.")
    assert with_system == "<|im_start|>system\nAdd.<|im_end|>\n" + text
    assert tiny_tokenizer(with_system)["input_ids"]  # the text tokenizes


def test_render_prompt_default_system_prompt_and_its_suppression(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer, chat_template=SMOLLM_TEMPLATE
    )
    example = PromptExample(messages=[{"role": "user", "content": "Hi"}], ground_truth="1", data_source="t")
    assert "named SmolLM" in render_prompt(tokenizer, example)
    suppressed = render_prompt(tokenizer, example, system_prompt="")
    assert (
        suppressed
        == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_template = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(no_template, example)


# ---------------------------------------------------------------- PromptDataset


def test_prompt_dataset_epochs_cover_every_example() -> None:
    examples = arithmetic_problems(10, seed=0)
    data = PromptDataset(examples, seed=1)
    first_epoch = data.next_batch(4) + data.next_batch(4) + data.next_batch(2)
    assert sorted(ex.question for ex in first_epoch) == sorted(ex.question for ex in examples)
    assert first_epoch != examples  # shuffled
    assert data.epoch == 0 and data.position == 10
    crossing = data.next_batch(15)  # all of epoch 1, then 5 of epoch 2
    assert data.epoch == 2 and data.position == 5
    assert sorted(ex.question for ex in crossing[:10]) == sorted(ex.question for ex in examples)
    assert crossing[:10] != first_epoch  # each epoch has its own order
    assert PromptDataset(examples, shuffle=False).next_batch(10) == examples
    with pytest.raises(ValueError, match="batch size"):
        data.next_batch(0)


def test_prompt_dataset_resume_serves_the_same_prompts() -> None:
    examples = arithmetic_problems(7, seed=0)
    original = PromptDataset(examples, seed=5)
    original.next_batch(3)
    original.next_batch(3)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON round trip
    expected = [original.next_batch(3) for _ in range(6)]

    resumed = PromptDataset(examples, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert [resumed.next_batch(3) for _ in range(6)] == expected

    with pytest.raises(ValueError, match="state is for 7 examples"):
        PromptDataset(examples[:6]).load_state_dict(state)
    changed = [*examples[:6], arithmetic_problems(8, seed=0)[7]]
    with pytest.raises(ValueError, match="different prompts"):
        PromptDataset(changed).load_state_dict(state)
    PromptDataset(changed).load_state_dict(state, strict=False)
