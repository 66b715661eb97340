"""Measured speed for `peftlab compare --plan`: how fast this machine runs the study's model, before anything trains.

The plan multiplies the study's work (example-forwards: a training row counts 3, for forward and backward) by the
tokens per example of the study's own data and divides by forward tokens/s measured here on a few real examples.
Each run also pays a fixed overhead: a fresh process (imports) and loading the model, both measured.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from peftlab.core.config import RunConfig
from peftlab.evaluate.scoring import mean_loss
from peftlab.recipes.train_run import prepare

SAMPLE = 8


@dataclass(frozen=True)
class Speed:
    """Forward tokens/s, mean tokens per training example, model load seconds and per-run overhead seconds."""

    tokens_per_s: float
    tokens_per_example: float
    load_s: float
    overhead_s: float


def measure(cfg: RunConfig, threads: int | None = None) -> Speed:
    """Load the study's model and data as a zero-shot run would and time forward passes over a few examples, on
    `threads` torch threads (a worker's share of the cores; default: torch's)."""
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ctx = prepare(replace(cfg, method=replace(cfg.method, name="zero-shot")))
    load_s = time.perf_counter() - t0
    items = (ctx.train or ctx.enc[(ctx.parts[0].key, "test")])[:SAMPLE]
    pad = ctx.fmt.tokenizer.pad_token_id
    mean_loss(ctx.loaded.model, ctx.loaded.kind, items, pad)  # warm-up: first calls pay for allocation
    t0 = time.perf_counter()
    mean_loss(ctx.loaded.model, ctx.loaded.kind, items, pad)
    seconds = time.perf_counter() - t0
    tokens = sum(e.length for e in items)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import peftlab.recipes.train_run"], check=True)  # a run's process start
    start_s = time.perf_counter() - t0
    per_example = statistics.fmean(e.length for e in (ctx.train or items))
    return Speed(tokens / seconds, per_example, load_s, load_s + start_s)
