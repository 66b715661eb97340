"""Median pruning of a tuning trial inside the worker that trains it.

One process owns an Optuna study and asks for trials (`recipes.search`); the workers only train. A worker cannot
ask the owner's study whether to prune after each epoch, so the owner sends, with each trial, a frozen copy of the
trials that had finished when it was asked for. The worker replays them into a throwaway in-memory study with the
same pruner, and judges its own epochs against them: Optuna's own `MedianPruner`, on the same evidence it would
have had. With one worker every earlier trial has finished at ask time, so this is exactly the sequential search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class Pruned(Exception):
    """A trial stopped after an epoch whose val metric was below the median: the trial ends, as a trial."""


@dataclass(frozen=True)
class EpochPruner:
    """How one trial is pruned: `median` against `finished` (frozen Optuna trials), or `none`."""

    pruner: str = "median"
    startup_trials: int = 2
    direction: str = "maximize"
    metric: str | None = None  # the val metric judged (`val_<metric>`); None: the first one logged
    last_epoch: int | None = None  # the run's final epoch, never pruned (None when max_steps ends it)
    finished: tuple = field(default=(), repr=False)

    def callback(self, seen: dict[int, float]) -> Callable[[int, dict], None]:
        """`on_epoch_end` for the training loop: record each epoch's val metric in `seen`, and raise
        `Pruned` when the median of the finished trials at that epoch is better."""
        import optuna

        pruner = (optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials) if self.pruner == "median"
                  else optuna.pruners.NopPruner())
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction=self.direction, pruner=pruner)
        study.add_trials(list(self.finished))
        trial = study.ask()

        def on_epoch_end(epoch: int, val_row: dict) -> None:
            key = judged_key(val_row, self.metric)
            if key is None:
                return
            seen[epoch] = float(val_row[key])
            trial.report(seen[epoch], epoch)
            # After the last epoch the run is as good as finished: keep it rather than prune it.
            last = self.last_epoch is not None and epoch >= self.last_epoch
            if not last and trial.should_prune():
                raise Pruned(f"epoch {epoch}: {key} {seen[epoch]:.4f} is below the median of the "
                                         "trials finished before it")

        return on_epoch_end


def judged_key(val_row: dict, metric: str | None) -> str | None:
    """The val metric a trial is judged on: `val_<metric>`, else the first val metric other than the loss."""
    wanted = f"val_{metric}" if metric else None
    if wanted in val_row:
        return wanted
    return next((k for k in val_row if k.startswith("val_") and k != "val_loss"), None)
