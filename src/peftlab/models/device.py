"""The device a run uses and the dtype its weights load in."""

from __future__ import annotations

import torch

from peftlab.core.errors import unknown_name


def pick_device(override: str | None = None) -> torch.device:
    """The device to use: the override if given, else cuda > mps > cpu."""
    if override and override != "auto":
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on AVX2)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """A dtype from its config name; None for "auto" (the device's default, see `default_dtype`)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise unknown_name("dtype", name, ["auto", *DTYPES])
    return DTYPES[name]
