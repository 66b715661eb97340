"""`peftlab precision`: does bf16 change what a run learns? fp32 seeds against one bf16 run, on val.

`train.mixed_precision: auto` picks bf16 from one batch (`train.measured_precision`): faster, and the same loss
within bf16's rounding. Rounding that is harmless on one batch can still add up over a run. So this trains the
run's config in fp32 over a few seeds, and once in bf16 (on the first seed), and compares their validation metric:
the fp32 seeds' spread is how far the result moves for reasons that have nothing to do with precision. A bf16 run
inside it is as good as any fp32 seed. One outside it is said, and recorded (`measured_precision.keep_fp32`):
from then on `auto` keeps fp32 for this model and method on this CPU, and each run's `result.json` says why.

Only val is scored (as in a tuning trial): the check never looks at the test split. The runs are ordinary run
folders under runs/<name>-precision/, so a stopped check reruns only what did not finish.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json
from peftlab.core.result import has_result, read_result
from peftlab.recipes.repeats import deterministic
from peftlab.recipes.search import trial_value
from peftlab.recipes.train_run import run_training
from peftlab.train.measured_precision import keep_fp32, within_seeds

CHECK_FILE = "precision_check.json"


@dataclass(frozen=True)
class PrecisionCheck:
    """fp32 seeds' and one bf16 run's val metric, and the verdict (`within`: bf16 is inside the fp32 spread)."""

    metric: str
    fp32: dict[int, float]  # seed -> val metric
    bf16: float
    bf16_seed: int
    within: bool
    reason: str


def _variant(cfg: RunConfig, precision: str, seed: int) -> RunConfig:
    """One run of the check: the config at `precision` ("no" is fp32) and `seed`, in the check's own folder."""
    return replace(cfg, name=f"{'fp32' if precision == 'no' else precision}-seed{seed}",
                   output_dir=str(Path(cfg.output_dir) / f"{cfg.name}-precision"),
                   train=replace(cfg.train, mixed_precision=precision, seed=seed))


def _val_metric(cfg: RunConfig, metric: str | None) -> tuple[float, str]:
    """Train `cfg` (unless its folder already holds a finished run) and read its val metric and that metric's name."""
    if not has_result(cfg.run_dir):
        run_training(cfg, score_test=False)
    result = read_result(cfg.run_dir)
    name = metric or result.primary_metric
    return trial_value(result, name), name


def check_precision(cfg: RunConfig, seeds: int = 3, metric: str | None = None) -> PrecisionCheck:
    """Train `cfg` in fp32 on `seeds` seeds (train.seed and the next ones) and in bf16 on the first, compare the
    val `metric` (default: the task's primary metric), record the verdict for `auto`, and write it to
    runs/<name>-precision/precision_check.json."""
    if seeds < 2:
        raise PeftlabError(f"--seeds: a spread needs at least 2 fp32 seeds, got {seeds}")
    if deterministic(cfg):
        raise PeftlabError(f"method.name: {cfg.method.name} trains no weights by gradient, so precision does not "
                           "change what it learns; nothing to check")
    first = cfg.train.seed
    fp32: dict[int, float] = {}
    for seed in range(first, first + seeds):
        print(f"fp32, seed {seed} ({seed - first + 1} of {seeds})", flush=True)
        fp32[seed], metric = _val_metric(_variant(cfg, "no", seed), metric)
    print(f"bf16, seed {first}", flush=True)
    bf16, _ = _val_metric(_variant(cfg, "bf16", first), metric)
    within, reason = within_seeds(bf16, list(fp32.values()), metric)
    check = PrecisionCheck(metric, fp32, bf16, first, within, reason)
    keep_fp32(f"{cfg.model.name} | {cfg.method.name}", None if within else reason)
    write_json(Path(cfg.output_dir) / f"{cfg.name}-precision" / CHECK_FILE, {
        "metric": metric, "fp32": {str(k): v for k, v in fp32.items()}, "bf16": bf16, "bf16_seed": first,
        "within": within, "reason": reason, "model": cfg.model.name, "method": cfg.method.name})
    return check
