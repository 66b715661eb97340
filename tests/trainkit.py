"""Helpers shared by the training tests: short run configs, train-log reading, and a 'sharpened' tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from builders import PUBMEDQA

from peftlab.core.config import MethodConfig, RunConfig, load_config
from peftlab.data.tasks import Task
from peftlab.methods.registry import apply_method, get_method
from peftlab.models.hf_folder import LoadedModel

# The result.json keys every run must write (the study report reads them).
RESULT_KEYS = {
    "method", "trainable_params", "total_params", "trainable_pct", "adapter_bytes", "train_seconds",
    "tokens_per_s", "peak_rss_mb", "best_val_loss", "last_train_loss", "versions",
}


def tiny_cfg(model: Path, method: str, out: Path, name: str | None = None, data: Path = PUBMEDQA,
             *overrides: str) -> RunConfig:
    """A run on 8 training and 4 eval examples, 2 steps, one thread (the tiny model runs fastest on one)."""
    base = [
        f"model.name={model}", "model.device=cpu", f"method.name={method}", f"data.path={data}",
        "data.limit_train=8", "data.limit_eval=4", "data.max_length=128", "train.max_steps=2", "train.threads=1",
        f"output_dir={out}", f"name={name or method}",
    ]
    return load_config(None, [*base, *overrides])


def adapt(loaded: LoadedModel, task: Task, cfg: MethodConfig) -> torch.nn.Module:
    """`apply_method` with the registry's entry for `cfg.name`, as the training recipe looks it up."""
    return apply_method(get_method(cfg.name), loaded, task, cfg)


def train_losses(run_dir: Path) -> list[float]:
    """The per-step training losses of a run, from train_log.jsonl (validation rows have no 'loss')."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def sharpen(src: Path, out: Path, kind: str, embed_std: float, other_std: float, seed: int = 0) -> Path:
    """A copy of a tiny model with larger random weights.

    At the usual 0.02 init, a 32-wide model's logits are nearly flat and only full fine-tuning can change them much
    (a final norm caps the hidden state, so adapters cannot raise the logit scale). Larger weights give the model
    the confident, input-dependent outputs a pretrained model has, which adapters can then steer.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                embedding = any(k in name for k in ("embed", "shared", "lm_head"))
                p.normal_(0, embed_std if embedding else other_std)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def start_compare(path: Path) -> subprocess.Popen:
    """`peftlab compare` as a shell would start it: the leader of its own process group, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", "compare", str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
