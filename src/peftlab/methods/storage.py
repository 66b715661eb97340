"""How a method's training is kept in a run folder and put back on a model: a standard peft adapter folder, a full
model folder of its own, the linear head, or nothing (the prompting baselines).

Each `Method` entry names its `Storage`: `train.save` writes through `save`, `methods.saved` reloads through
`attach`, so no stage branches on a method's name to know where its weights are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.core.config import MethodConfig
from peftlab.data.tasks import Task
from peftlab.methods.head import load_head, save_head
from peftlab.methods.lifecycle import save_adapter
from peftlab.models.adapters import load_adapter
from peftlab.models.hf_folder import LoadedModel


@dataclass(frozen=True)
class Storage:
    """Where a method's training lives in a run folder, and how it is written and reloaded."""

    folder: str  # the run folder's subfolder that holds what the method trained ("" when nothing trains)
    # Writes `<run_dir>/<folder>` and returns the bytes of the saved weights; None: the method saves nothing.
    save: Callable[[torch.nn.Module, LoadedModel, Path], int] | None
    # The module that scores, from the loaded model and the run folder (the model itself where nothing is added).
    attach: Callable[[LoadedModel, Task, MethodConfig, Path], torch.nn.Module]


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def _save_adapter(model: torch.nn.Module, loaded: LoadedModel, run_dir: Path) -> int:
    # A PiSSA/OLoRA adapter is saved as the LoRA that fits the original base (methods.lifecycle).
    out = run_dir / ADAPTER.folder
    save_adapter(model, out)
    return _weights_bytes(out)


def _save_model(model: torch.nn.Module, loaded: LoadedModel, run_dir: Path) -> int:
    out = run_dir / MODEL.folder
    model.save_pretrained(out, safe_serialization=True)
    # A vision-language model's processor holds its tokenizer and image settings.
    (loaded.processor or loaded.tokenizer).save_pretrained(out)
    return _weights_bytes(out)


def _save_head(model: torch.nn.Module, loaded: LoadedModel, run_dir: Path) -> int:
    return save_head(model, loaded.name, run_dir)  # into `<run_dir>/head`, HEAD's folder


def _attach_adapter(loaded: LoadedModel, task: Task, cfg: MethodConfig, run_dir: Path) -> torch.nn.Module:
    return load_adapter(loaded, run_dir)


def _as_loaded(loaded: LoadedModel, task: Task, cfg: MethodConfig, run_dir: Path) -> torch.nn.Module:
    return loaded.model


ADAPTER = Storage("adapter", _save_adapter, _attach_adapter)  # a peft adapter on the run's base
MODEL = Storage("model", _save_model, _as_loaded)  # full fine-tuning: a model folder that replaces the base
HEAD = Storage("head", _save_head, load_head)  # the linear head (and its text heads) on the frozen base
BASE = Storage("", None, _as_loaded)  # zero- and few-shot: the base as it is
