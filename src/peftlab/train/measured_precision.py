"""`train.mixed_precision: auto` on a CPU: bf16 autocast where this machine measures it faster, else fp32.

Whether bf16 pays on a CPU depends on the chip, not on a rule: on an AMD Zen 4 (AVX512_BF16) `peftlab bench train`
measured a bf16 matmul at 2.19x fp32, on an Intel core without AMX bf16 ran at 0.52x, and a Zen 3 (AVX2) has no
bf16 arithmetic at all. So `auto` times a short forward and backward of the run's own first batch in fp32 and under
bf16 autocast, here, once, and caches the answer per CPU model, torch version, model, method and batch shape
rounded up to 64 (`$PEFTLAB_HOME/precision.json`). It picks bf16 only where bf16 is at least `MIN_SPEEDUP` faster
and the loss of that batch agrees with fp32's within bf16's rounding (`LOSS_TOLERANCE`); otherwise fp32.

Scoring (label scores, the first greedy token) is probed the same way, forward only, and there bf16 must also give
every answer that fp32 gives on the first `SCORING_ROWS` test items (`measure_scoring`).

The probe leaves no trace on the run: gradients are cleared and the random number generator is put back, so a run
that keeps fp32 trains exactly as without the probe. `PEFTLAB_AUTO_PRECISION=fp32` skips the probe (the test suite
sets it, so that CI is the same on every CPU).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from peftlab.core.files import read_json, write_json
from peftlab.core.resources import cpu_model
from peftlab.models.packaged import peftlab_home

MIN_SPEEDUP = 1.2  # bf16 must be this much faster: below it, the rounding is not worth it
# bf16 keeps 8 bits of mantissa, a relative rounding of 2^-8 = 0.4% per value; the loss of a batch, a sum over
# thousands of rounded products, lands within a few of those of fp32's. 2% leaves room for that and catches a
# model whose activations overflow or cancel in bf16.
LOSS_TOLERANCE = 0.02
ROUNDS = 3  # timed forward+backward passes per precision, after one warm-up each
# Scoring's answers are compared on this many items: on SmolLM2 and PubMedQA bf16 changed 2 of 49 answers, which
# a first batch of 4 rows would miss more often than not (0.96^4 = 85%), and 64 rows catches (0.96^64 = 7%).
SCORING_ROWS = 64
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in, and why: `autocast` is "bf16" or "fp32"."""

    autocast: str
    source: str  # "measured", "cached", "configured" or "not measured"
    reason: str
    speedup: float | None = None  # bf16 forward+backward speed over fp32's, on this batch shape and machine
    loss_gap: float | None = None  # |loss_bf16 - loss_fp32| / |loss_fp32| on the same batch
    answers_changed: int | None = None  # scoring: probe rows whose answer (argmax) bf16 changed

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.autocast == "bf16" else None


def decide(fp32_s: float, bf16_s: float, fp32_loss: float, bf16_loss: float) -> PrecisionChoice:
    """The choice from measured times (seconds per pass) and the two losses of the same batch."""
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    gap = abs(bf16_loss - fp32_loss) / max(abs(fp32_loss), 1e-12)
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice("fp32", "measured", f"bf16 measured {speedup:.2f}x fp32 on this CPU, under the "
                               f"{MIN_SPEEDUP}x it must gain", speedup, gap)
    if not gap <= LOSS_TOLERANCE:  # also a NaN
        return PrecisionChoice("fp32", "measured", f"bf16 is {speedup:.2f}x fp32 here, but its loss differs from "
                               f"fp32's by {100 * gap:.1f}% (over {100 * LOSS_TOLERANCE:.0f}%)", speedup, gap)
    return PrecisionChoice("bf16", "measured", f"bf16 measured {speedup:.2f}x fp32 on this CPU, loss within "
                           f"{100 * gap:.2f}% of fp32's", speedup, gap)


def _timed_pass(loss_fn, dtype: torch.dtype | None) -> tuple[float, float]:
    """Seconds per forward+backward and the loss, under autocast to `dtype` (None: fp32)."""
    context = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else nullcontext
    times, loss = [], 0.0
    for i in range(ROUNDS + 1):
        t0 = time.perf_counter()
        with context():
            value = loss_fn()
        value.backward()
        if i:  # the first pass pays for allocation and kernel selection
            times.append(time.perf_counter() - t0)
        loss = float(value.detach())
    return min(times), loss


def measure(model: torch.nn.Module, loss_fn) -> PrecisionChoice:
    """Time `loss_fn()` (the run's first batch, forward) with its backward in fp32 and bf16; clear the gradients
    and restore the random state afterwards, so the run is as if the probe had not happened."""
    rng = torch.get_rng_state()
    try:
        fp32_s, fp32_loss = _timed_pass(loss_fn, None)
        bf16_s, bf16_loss = _timed_pass(loss_fn, torch.bfloat16)
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
    return decide(fp32_s, bf16_s, fp32_loss, bf16_loss)


def decide_scoring(fp32_s: float, bf16_s: float, changed: int, rows: int) -> PrecisionChoice:
    """Scoring's choice from measured times (seconds per forward) and how many of the probe's `rows` answers bf16
    changed. A scored answer is an argmax: unlike a training loss, one flipped row is a different result, so bf16
    must give every answer fp32 gives."""
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice("fp32", "measured", f"bf16 scoring measured {speedup:.2f}x fp32 on this CPU, under "
                               f"the {MIN_SPEEDUP}x it must gain", speedup, answers_changed=changed)
    if changed:
        return PrecisionChoice("fp32", "measured", f"bf16 scoring is {speedup:.2f}x fp32 here, but it changed "
                               f"{changed} of {rows} probe answers", speedup, answers_changed=changed)
    return PrecisionChoice("bf16", "measured", f"bf16 scoring measured {speedup:.2f}x fp32 on this CPU, the same "
                           f"answers on all {rows} probe items", speedup, answers_changed=0)


@torch.inference_mode()
def _seconds(forward, bf16: bool) -> float:
    """Seconds per `forward()`: the best of `ROUNDS`, after one warm-up."""
    times = []
    for i in range(ROUNDS + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def _answers(answers, bf16: bool) -> torch.Tensor:
    """The probe rows' answers (argmax per row) in fp32 or under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return answers().float().argmax(-1)


def measure_scoring(model: torch.nn.Module, forward, answers) -> PrecisionChoice:
    """Time `forward()` (the first scoring batch) in fp32 and under bf16 autocast, and count the rows of
    `answers()` ((rows, choices) scores of the first `SCORING_ROWS` items) whose answer bf16 changes. The model
    scores in eval mode (no dropout, as scoring runs), and the random state is put back."""
    rng, training = torch.get_rng_state(), model.training
    model.eval()
    try:
        fp32_s, bf16_s = _seconds(forward, bf16=False), _seconds(forward, bf16=True)
        fp32_answers, bf16_answers = _answers(answers, bf16=False), _answers(answers, bf16=True)
    finally:
        model.train(training)
        torch.set_rng_state(rng)
    return decide_scoring(fp32_s, bf16_s, int((fp32_answers != bf16_answers).sum()), len(fp32_answers))


def pinned() -> PrecisionChoice | None:
    """fp32 without a probe where `PEFTLAB_AUTO_PRECISION=fp32` says so (the test suite), else None."""
    if os.environ.get("PEFTLAB_AUTO_PRECISION") == "fp32":
        return PrecisionChoice("fp32", "not measured", "PEFTLAB_AUTO_PRECISION=fp32")
    return None


def choose(key: str, probe: Callable[[], PrecisionChoice]) -> PrecisionChoice:
    """The cached choice for `key` (model, method, what is timed and its shape) on this CPU and torch, else
    `probe()`'s fresh measurement (`measure` for training, `measure_scoring` for scoring), cached."""
    if pinned() is not None:
        return pinned()
    path = peftlab_home() / CACHE_FILE
    full_key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {key}"
    try:
        cached = read_json(path).get(full_key) if path.is_file() else None
    except (OSError, ValueError):
        cached = None  # a cut-off cache is measured again, and rewritten
    if isinstance(cached, dict):
        try:
            return PrecisionChoice(**{**cached, "source": "cached"})
        except TypeError:
            pass
    choice = probe()
    try:
        known = read_json(path) if path.is_file() else {}
        write_json(path, {**(known if isinstance(known, dict) else {}), full_key: asdict(choice)})
    except (OSError, ValueError, json.JSONDecodeError):
        pass  # an unwritable cache costs a probe per run, nothing else
    return choice
