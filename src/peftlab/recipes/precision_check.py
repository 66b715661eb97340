"""`peftlab precision`: does bf16 change what a run learns? fp32 seeds against one bf16 run, on val.

`train.mixed_precision: auto` picks bf16 from one batch (`train.measured_precision`): faster, and the same loss
within bf16's rounding. Rounding that is harmless on one batch can still add up over a run. So this trains the
run's config in fp32 over a few seeds, and once in bf16 (on the first seed), and compares their validation metric:
the fp32 seeds' spread is how far the result moves for reasons that have nothing to do with precision. A bf16 run
within it (or above it) is as good as any fp32 seed. One below every seed is said, and recorded
(`measured_precision.keep_fp32`): from then on `auto` keeps fp32 for this model and method on this CPU, and each
run's `result.json` says why. A bf16 run that changes nothing lands there by chance 1 in (seeds + 1); that false
alarm costs speed, never quality, and a later check where bf16 agrees takes it back.

Only val is scored (as in a tuning trial): the check never looks at the test split. The runs are ordinary run
folders under runs/<name>-precision/: a rerun reuses a finished one trained with the same config, goes on from a
stopped one's checkpoint, and refuses one trained with another config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from peftlab.core.config import RunConfig, differing_settings, flat_settings
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json
from peftlab.core.result import has_result, read_result, run_config
from peftlab.recipes.repeats import deterministic
from peftlab.recipes.search import trial_value
from peftlab.recipes.train_run import run_training
from peftlab.train.measured_precision import below_seeds, keep_fp32

CHECK_FILE = "precision_check.json"


@dataclass(frozen=True)
class PrecisionCheck:
    """fp32 seeds' and one bf16 run's val metric, and the verdict (`below`: bf16 fell below every fp32 seed)."""

    metric: str
    fp32: dict[int, float]  # seed -> val metric
    bf16: float
    bf16_seed: int
    below: bool
    reason: str


def _variant(cfg: RunConfig, precision: str, seed: int) -> RunConfig:
    """One run of the check: the config at `precision` ("no" is fp32) and `seed`, in the check's own folder; a
    stopped one goes on from its checkpoint."""
    return replace(cfg, name=f"{'fp32' if precision == 'no' else precision}-seed{seed}",
                   output_dir=str(Path(cfg.output_dir) / f"{cfg.name}-precision"),
                   train=replace(cfg.train, mixed_precision=precision, seed=seed, resume=True))


def _same_config(cfg: RunConfig) -> None:
    """A finished run folder of the check must hold this config: another's metric would be compared, and its
    verdict filed under this model and method."""
    done, wanted = flat_settings(run_config(cfg.run_dir)), flat_settings(cfg)
    differ = differing_settings(done, wanted, ignore=("train.resume",))
    if differ:
        key = differ[0]
        raise PeftlabError(f"{cfg.run_dir}: trained with {key} {done.get(key)!r}, this check has {wanted.get(key)!r}; "
                           f"delete {Path(cfg.output_dir)} or give the check another name (name=...)")


def _val_metric(cfg: RunConfig, metric: str | None) -> tuple[float, str]:
    """Train `cfg` (unless its folder holds a finished run of the same config) and read its val metric and that
    metric's name."""
    if has_result(cfg.run_dir):
        _same_config(cfg)
    else:
        run_training(cfg, score_test=False)
    result = read_result(cfg.run_dir)
    name = metric or result.primary_metric
    return trial_value(result, name), name


def check_precision(cfg: RunConfig, seeds: int = 3, metric: str | None = None) -> PrecisionCheck:
    """Train `cfg` in fp32 on `seeds` seeds (train.seed and the next ones) and in bf16 on the first, compare the
    val `metric` (default: the task's primary metric; higher is better), write the verdict to
    runs/<name>-precision/precision_check.json and record it for `auto`."""
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
    below, reason = below_seeds(bf16, list(fp32.values()), metric)
    write_json(Path(cfg.output_dir) / f"{cfg.name}-precision" / CHECK_FILE, {
        "metric": metric, "fp32": {str(k): v for k, v in fp32.items()}, "bf16": bf16, "bf16_seed": first,
        "below": below, "reason": reason, "model": cfg.model.name, "method": cfg.method.name})
    keep_fp32(f"{cfg.model.name} | {cfg.method.name}", reason if below else None)
    return PrecisionCheck(metric, fp32, bf16, first, below, reason)
