"""Atomic checkpoints: model (safetensors), optimizer, scheduler, RNG states and trainer state.

A checkpoint is written into a temporary sibling directory and renamed into place, so an interrupted
save never leaves a half-written ``step_N``; ``latest_checkpoint`` only ever sees complete ones.
"""

from __future__ import annotations

import os
import pickle
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
    """The python, numpy and torch RNG states (CUDA too when present), as tensors and plain values only, so that
    the state file loads with ``torch.load(weights_only=True)``."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, a tuple of ints, None or a float)
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 values: torch has no uint32 pickling
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        np.random.set_state(
            (
                saved["bit_generator"],
                saved["keys"].numpy().astype(np.uint32),
                saved["position"],
                saved["has_gauss"],
                saved["cached_gaussian"],
            )
        )
    else:  # checkpoints before the weights_only format hold numpy's own tuple
        np.random.set_state(saved)
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
    _readable_by_umask(staging)
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
    """The optimizer/scheduler/RNG/trainer state saved beside the model weights.

    Loaded with ``weights_only=True``: tensors and plain values only, so a run directory from someone else cannot
    run code on ``--resume``. Checkpoints written before the RNG states were stored as tensors hold numpy arrays,
    which are let through as numpy's own arrays (as transformers does for its RNG files), nothing else.
    """
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        culprit = (
            f"it calls {named[1]}" if named else "it is not a file torch.load(weights_only=True) accepts"
        )
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run code "
            f"when loaded, and cegppo never writes any ({culprit}). Only resume run directories you trust"
        ) from None


# What numpy arrays unpickle through: the RNG state of checkpoints from before it was stored as a tensor.
_NUMPY_ARRAY_GLOBALS = [
    (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,  # numpy.core before numpy 2
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def _readable_by_umask(root: Path) -> None:
    """Give every file under ``root`` the permissions the umask allows (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
