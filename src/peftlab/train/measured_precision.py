"""`train.mixed_precision: auto` on a CPU: bf16 autocast where this machine measures it faster, else fp32.

Whether bf16 pays on a CPU depends on the chip, not on a rule: on an AMD Zen 4 (AVX512_BF16) `peftlab bench train`
measured a bf16 matmul at 2.19x fp32, on an Intel core without AMX bf16 ran at 0.52x, and a Zen 3 (AVX2) has no
bf16 arithmetic at all. So `auto` times a short forward and backward of the run's own first batch in fp32 and under
bf16 autocast, here, once, and caches the answer per CPU model, torch version, model, method and batch shape
rounded up to 64 (`$PEFTLAB_HOME/precision.json`). It picks bf16 only where bf16 is at least `MIN_SPEEDUP` faster
and the loss of that batch agrees with fp32's within bf16's rounding (`LOSS_TOLERANCE`); otherwise fp32.

Scoring (label scores, the first greedy token) is probed the same way, forward only, and there bf16 must also give
every answer that fp32 gives on the first `SCORING_ROWS` test items (`measure_scoring`). That probe is only run
where it can pay for itself, on a run that scores enough items (`scoring_probe_items`).

The probe leaves no trace on the run: gradients are cleared and the random number generator is put back, so a run
that keeps fp32 trains exactly as without the probe. `PEFTLAB_AUTO_PRECISION=fp32` skips the probe (the test suite
sets it, so that CI is the same on every CPU).

A one-batch loss check cannot see what bf16 does to a whole run. `peftlab precision` trains a run in fp32 over a
few seeds and once in bf16, and where bf16's validation metric falls below the fp32 seeds' spread it records
that (`keep_fp32`): from then on `auto` keeps fp32 for that model and method on this CPU and says why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch

from peftlab.core.errors import PeftlabError
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
# bf16 can save at most 1 - 1/2.19 = 54% of a scoring pass: the 2048-cube matmul's gain on a Zen 4 with AVX512_BF16.
BF16_MAX_SAVING = 1 - 1 / 2.19
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in, and why: `autocast` is "bf16" or "fp32"."""

    autocast: str
    source: str  # "measured", "cached", "checked" (`peftlab precision`), "configured" or "not measured"
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


def scoring_probe_items(first_rows: int) -> int:
    """The fewest scored items on which the scoring probe can pay for itself: it scores `SCORING_ROWS` items in fp32
    and in bf16 and times `ROUNDS + 1` first batches of `first_rows` rows in each, and bf16 saves at most
    `BF16_MAX_SAVING` of each item it then scores. (PubMedQA at 256 tokens: 4-row batches, 160 items' work, 295.)"""
    cost = 2 * SCORING_ROWS + 2 * (ROUNDS + 1) * first_rows
    return int(-(-cost // BF16_MAX_SAVING))


def below_seeds(bf16: float, fp32: list[float], metric: str) -> tuple[bool, str]:
    """Whether a bf16 run's validation `metric` (higher is better) falls below every fp32 seed's, and a line that
    says so against their spread. A bf16 run that changes nothing does so by chance 1 in (seeds + 1): a false alarm
    that costs speed, never quality. One above every seed is no reason to give bf16 up."""
    if len(fp32) < 2:
        raise ValueError(f"a spread needs at least 2 fp32 seeds, got {len(fp32)}")
    low, high = min(fp32), max(fp32)
    spread = f"the fp32 seeds' {low:.4f} to {high:.4f} ({len(fp32)} seeds)"
    if bf16 < low:
        return True, f"bf16's val {metric} {bf16:.4f} is below {spread}"
    return False, f"bf16's val {metric} {bf16:.4f} is {'within' if bf16 <= high else 'above'} {spread}"


def _check_key(scope: str) -> str:
    """Where `peftlab precision`'s verdict for `scope` ("model | method") is cached: per CPU model and torch."""
    return f"{cpu_model()} | torch {torch.__version__} | {scope} | checked against fp32 seeds"


def _read_cache() -> dict:
    path = peftlab_home() / CACHE_FILE
    try:
        known = read_json(path) if path.is_file() else {}
    except (OSError, PeftlabError):
        known = {}  # a cut-off cache is measured again, and rewritten
    return known if isinstance(known, dict) else {}


def _write_cache(entries: dict) -> str | None:
    """Write the cache, or return why it could not be written: an unwritable cache costs a probe per run, nothing
    else, so a run goes on."""
    try:
        write_json(peftlab_home() / CACHE_FILE, entries)
    except PeftlabError as err:  # write_json's one line: the file and the reason
        return str(err)
    return None


def keep_fp32(scope: str, reason: str | None) -> None:
    """Record `peftlab precision`'s verdict for `scope`: with a `reason`, `auto` keeps fp32 for it on this CPU and
    torch from now on; with None (bf16 agreed with fp32), an earlier verdict is taken back."""
    entries = _read_cache()
    key = _check_key(scope)
    entries.pop(key, None)
    if reason is not None:
        entries[key] = asdict(PrecisionChoice("fp32", "checked", f"{reason}: keeping fp32 (peftlab precision)"))
    err = _write_cache(entries)
    if err is not None:
        raise PeftlabError(f"{err}: the precision check was not recorded; set PEFTLAB_HOME to a writable folder")


def pinned() -> PrecisionChoice | None:
    """fp32 without a probe where `PEFTLAB_AUTO_PRECISION=fp32` says so (the test suite), else None."""
    if os.environ.get("PEFTLAB_AUTO_PRECISION") == "fp32":
        return PrecisionChoice("fp32", "not measured", "PEFTLAB_AUTO_PRECISION=fp32")
    return None


def _cached(entry) -> PrecisionChoice | None:
    if isinstance(entry, dict):
        try:
            return PrecisionChoice(**entry)
        except TypeError:
            return None  # another peftlab's entry: measured again
    return None


def cached(key: str, entries: dict | None = None) -> PrecisionChoice | None:
    """The cached choice for `key` on this CPU, torch and thread count (in `entries`, default the cache file's), or
    None where nothing was measured."""
    entry = _cached((_read_cache() if entries is None else entries).get(_full_key(key)))
    return None if entry is None else replace(entry, source="cached")


def _full_key(key: str) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {key}"


def choose(key: str, probe: Callable[[], PrecisionChoice], scope: str | None = None) -> PrecisionChoice:
    """The cached choice for `key` (model, method, what is timed and its shape) on this CPU and torch, else
    `probe()`'s fresh measurement (`measure` for training, `measure_scoring` for scoring), cached. A training
    `scope` ("model | method") that `peftlab precision` found worse in bf16 keeps fp32 without a probe."""
    if pinned() is not None:
        return pinned()
    entries = _read_cache()
    checked = _cached(entries.get(_check_key(scope))) if scope is not None else None
    if checked is not None:
        return checked
    known = cached(key, entries)
    if known is not None:
        return known
    choice = probe()
    _write_cache({**_read_cache(), _full_key(key): asdict(choice)})
    return choice
