"""Atomic checkpoints: model (safetensors), optimizer, scheduler, RNG states and trainer state.

A checkpoint is written into a temporary sibling directory and renamed into place, so an interrupted
save never leaves a half-written ``step_N``; ``latest_checkpoint`` only ever sees complete ones.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch RNG states (CUDA too when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoints_dir/step_{step}`` atomically and return its path.

    ``model/`` is a loadable transformers directory (weights and tokenizer), so a checkpoint can be
    evaluated or trained from like any model.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step}"
    staging = checkpoints_dir / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(staging / MODEL_DIR)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "trainer": trainer_state,
        },
        staging / STATE_FILE,
    )
    _fsync_tree(staging)
    if final.exists():  # re-saving a step (e.g. SIGINT right after a periodic save): swap, then drop the old
        retired = checkpoints_dir / f".step_{step}.old-{os.getpid()}"
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired)
    else:
        staging.rename(final)
    return final


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints under ``checkpoints_dir``, oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    steps = [
        (int(match.group(1)), path)
        for path in checkpoints_dir.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(steps)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = complete_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` 0: none deleted); return those deleted.

    Only after a save has completed, so a crash in between leaves one checkpoint more, never one fewer.
    """
    old = complete_checkpoints(checkpoints_dir)[:-keep] if keep else []
    for path in old:
        shutil.rmtree(path)
    return old


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/trainer state saved beside the model weights."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    # Our own file: it holds numpy RNG state and python objects, which weights_only refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
