"""Resumable training state: what the loop has done so far, saved atomically so `--resume` continues exactly.

A checkpoint holds the trainable weights, the optimizer and schedule, both RNGs and the loop's own counters. Only
tensors and plain values go in, so it loads with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass, field, fields
from io import BytesIO
from pathlib import Path

import torch

from peftlab.core.config import differing_settings
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_bytes_atomic


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights that train (an adapter's, or every weight for full fine-tuning)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    """Where the loop stands. Saved in checkpoints, so a killed run continues exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    start: int = 0  # index of the next micro-batch within this epoch's shard
    tokens: int = 0
    seconds: float = 0.0
    last_loss: float | None = None
    stale: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    best_val_metrics: dict | None = None  # the best epoch's full val scores, when the whole split was scored
    log: list = field(default_factory=list)
    done: bool = False  # training finished; the run folder's results were not all written yet
    resumed_at: list = field(default_factory=list)  # the steps at which the run went on from a checkpoint
    precision: dict | None = None  # the run's `measured_precision.PrecisionChoice`, kept across a resume
    settings: dict | None = None  # the model, data, method and train settings it trains with (`resume_settings`)


# What a resume may change: where it runs and how it reports, not what it computes.
RESUME_MAY_CHANGE = ("train.resume", "train.threads", "train.report_to", "model.device")


def resume_settings(flat: dict) -> dict:
    """The settings a checkpoint must be resumed with, from a config's `core.config.flat_settings`: every model,
    data, method and train key but those in `RESUME_MAY_CHANGE`."""
    return {k: v for k, v in flat.items()
            if k.split(".")[0] in ("model", "data", "method", "train") and k not in RESUME_MAY_CHANGE}


def check_resumable(path: Path, state: TrainState, settings: dict) -> None:
    """A checkpoint resumes only with the settings it was trained with. The optimizer and schedule it restores carry
    the old learning rate, so a resume with a changed `train.lr` would train on with the old one while the run
    folder recorded the new. (A checkpoint of an older peftlab, with no settings, is taken as it is.)"""
    if state.settings is None:
        return
    differ = differing_settings(state.settings, settings)
    if differ:
        key = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise PeftlabError(f"{path}: trained with {key} {state.settings.get(key)!r}, this run has "
                           f"{settings.get(key)!r}{more}; resume with the settings it was trained with, or rerun "
                           "without --resume to train from step 0 (it replaces the checkpoint)")


def save_checkpoint(path: Path, state: TrainState, model, optimizer, scheduler) -> None:
    """Write model, optimizer, schedule, RNG and loop state atomically (temp file + rename)."""
    payload = {
        "state": {f.name: getattr(state, f.name) for f in fields(TrainState) if f.name != "best_state"},
        "best_state": state.best_state,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    buffer = BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint written by `save_checkpoint` (tensors only: `weights_only=True`, no pickled code).

    A checkpoint that cannot be read (cut off, overwritten) or that does not fit the run (its method settings were
    changed since) is one line naming it: nothing of it is used, and the run can start over without --resume.
    """
    try:
        payload = torch.load(path, weights_only=True)
        state = TrainState(**payload["state"], best_state=payload["best_state"])
        model.load_state_dict(payload["model"], strict=False)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["torch_rng"])
        random.setstate(payload["python_rng"])
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PeftlabError(f"{path}: not a checkpoint of this run ({reason[:200]}); rerun without --resume to train "
                           "from step 0 (it replaces the checkpoint)") from None
    return state
