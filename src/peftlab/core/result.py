"""The result of one run: the single definition of `result.json`, written and read only here.

A run is a function call that returns a `RunResult` (`recipes.runner.run_task`), wherever it ran: a local worker
process or a Ray node. `status` says how it ended. Only a finished run (`done`) has a `result.json` in its folder:
the file's presence marks the run complete, so a rerun of a study skips it. A run that could not run here
(`not_run`: a missing package or backend) or that failed carries its one-line `reason` back to the study instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftlab.core.config import RunConfig, read_run_config
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json

RESULT_FILE = "result.json"

Status = Literal["done", "not_run", "failed", "stopped", "pruned"]


@dataclass
class RunResult:
    """What one run measured: quality (`metrics`, flat keys such as `test_accuracy`) beside cost."""

    name: str
    method: str
    status: Status = "done"
    reason: str | None = None  # not_run, failed, stopped, pruned: the one line that says why
    task: str | None = None
    model: str | None = None
    task_kind: str | None = None  # classification, generation or mixture
    primary_metric: str | None = None
    trainable_params: int = 0
    total_params: int = 0
    trainable_pct: float = 0.0
    adapter_bytes: int = 0
    train_steps: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float | None = None
    last_train_loss: float | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    lr: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    weights_mb: float | None = None  # the weights as stored (a 4-bit base at its packed size)
    wall_seconds: float | None = None
    resumed_at: list = field(default_factory=list)  # steps at which training went on from a checkpoint
    precision: dict | None = None  # what training computed in and why (`train.measured_precision.PrecisionChoice`)
    scoring_precision: dict | None = None  # what test scoring computed in and why (`PrecisionChoice`)
    frozen_pass: dict | None = None  # prompts read through the shared frozen-base pass, and how many were stored
    truncated_examples: int = 0  # rows cut to data.max_length
    dropped_examples: int = 0  # training rows left out: over data.max_length even cut
    train_mix: dict | None = None  # a mixture: training rows drawn per task
    plain_path: str | None = None  # why the run went without peftlab's speed paths, or None
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # fields of a newer or older peftlab, kept as they were

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict:
        """The JSON object of `result.json`: every field at the top level, `extra`'s fields beside them."""
        data = dataclasses.asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def write_result(run_dir: Path, result: RunResult) -> Path:
    """Write `<run_dir>/result.json` atomically (it is written last: its presence marks the run complete)."""
    path = Path(run_dir) / RESULT_FILE
    write_json(path, result.to_dict())
    return path


def read_result(run_dir: Path, fix: str = "delete it and rerun that run") -> RunResult:
    """Read `<run_dir>/result.json`; a missing, cut-off or overwritten file is one line naming it and `fix`."""
    path = Path(run_dir) / RESULT_FILE
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftlabError(f"{path}: no such file; the run has not finished (rerun it)") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        raise PeftlabError(f"{path}: not readable JSON ({str(err).splitlines()[0]}); the file may have been cut "
                           "off or overwritten") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("method"), str):
        raise PeftlabError(f"{path}: not a run result (a JSON object); {fix}")
    return RunResult.from_dict(data)


def has_result(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished."""
    return (Path(run_dir) / RESULT_FILE).is_file()


def run_config(run_dir: Path) -> RunConfig:
    """The config a finished run folder was trained with (its `config.yaml`)."""
    run_dir = Path(run_dir)
    if not has_result(run_dir) or not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir}: not a finished run folder (no result.json / config.yaml)")
    return read_run_config(run_dir / "config.yaml")
