"""benchmarks/gpu_check.py in its reduced CPU mode, so the GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import json
import math

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("benchmarks/gpu_check.py")


def test_cpu_mode_runs_every_case_and_writes_one_json_line_per_case(gpu_check, tmp_path):
    out = tmp_path / "check.jsonl"
    report = gpu_check.main(["--cpu", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(gpu_check.CASES) and all(json.loads(line) for line in lines)
    assert gpu_check.read_report(out) == {"machine": report["machine"], "cases": report["cases"]}
    assert set(report["cases"]) == set(gpu_check.CASES)
    for name, result in report["cases"].items():
        assert result["ok"], (name, result.get("trace"))
    for model in ("smollm2_135m", "qwen2_1p5b"):
        fused = report["cases"][f"fused_logprobs/{model}"]
        # bfloat16 on both paths; the fused op accumulates in float32, the naive one in bfloat16 logits.
        assert fused["max_abs_diff_logprob"] < 0.1 and fused["max_abs_diff_entropy"] < 0.1, fused
        assert fused["time_ratio_naive_over_fused"] > 0 and fused["naive_peak_mb"] is None  # no CUDA here
        shared = report["cases"][f"shared_prompt/{model}"]
        # the same pass in another order, both in bfloat16
        assert shared["max_abs_diff_logprob"] < 0.1 and shared["max_abs_diff_entropy"] < 0.1, shared
        assert shared["grad_rel_diff"] < 0.05 and shared["time_ratio_plain_over_shared"] > 0, shared
    for name in ("fp32_autocast_T1.2", "fp32_autocast_T0.6_ckpt"):
        fused = report["cases"][f"fused_logprobs/qwen2_1p5b/{name}"]
        assert fused["dtype"] == "torch.float32" and fused["autocast"] and fused["temperature"] != 1
        assert fused["max_abs_diff_logprob"] < 0.1 and fused["max_abs_diff_entropy"] < 0.1, fused
    assert report["cases"]["fused_logprobs/qwen2_1p5b/fp32_autocast_T0.6_ckpt"]["gradient_checkpointing"]
    long = report["cases"]["long_micro_batch/qwen2_1p5b"]
    assert long["finite"] and long["real_tokens"] < long["padded_tokens"] and long["estimate_mb"] > 0, long
    optimizer = report["cases"]["optimizer/qwen2_1p5b"]
    assert set(optimizer) >= {"float32", "bf16_masters", "bf16_offload", "ok"}
    assert all(optimizer[label]["grad_norm_finite"] for label in ("float32", "bf16_masters", "bf16_offload"))
    step = report["cases"]["trainer_step_hf"]
    assert step["metrics_finite"] and step["timing/step_s"] > 0 and math.isfinite(step["actor/grad_norm"])


def test_a_failing_case_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(mode):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_check.CASES, "fused_logprobs/qwen2_1p5b", broken)
    out = tmp_path / "check.jsonl"
    report = gpu_check.main(
        [
            "--cpu",
            "--out",
            str(out),
            "--only",
            "fused_logprobs/qwen2_1p5b",
            "fused_logprobs/smollm2_135m",
        ]
    )
    assert (
        report["cases"]["fused_logprobs/qwen2_1p5b"]["error"]
        == "RuntimeError: CUDA error: an illegal memory access"
    )
    assert report["cases"]["fused_logprobs/smollm2_135m"]["ok"]
    assert "trainer_step_hf" not in report["cases"]
    assert gpu_check.read_report(out)["cases"]["fused_logprobs/qwen2_1p5b"]["ok"] is False
