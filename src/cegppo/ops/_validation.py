"""Argument checks shared by the log-prob/entropy kernels; each failure is a ValueError naming the culprit."""

from __future__ import annotations

import math

import torch


def check_settings(temperature: float, chunk_size: int) -> None:
    """Reject a temperature that is not finite and positive, and a chunk size that is not a positive int."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_labels(labels: torch.Tensor, expected_shape: torch.Size, vocab_size: int, what: str) -> None:
    """Labels must be an integer tensor of ``expected_shape`` with every id in [0, vocab_size)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {what} needs {tuple(expected_shape)} "
            "(one label per token)"
        )
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"labels must lie in [0, {vocab_size}), got values in [{low}, {high}]")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
