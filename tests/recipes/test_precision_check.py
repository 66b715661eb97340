"""`peftlab precision`: fp32 seeds against one bf16 run on val; a bf16 run below every fp32 seed makes `auto` keep
fp32 for that model and method, says so, and a later check where bf16 agrees takes that back. The runs train for
real on the tiny model; their val metric is set here, since a 2-step tiny run's metric says nothing about bf16."""

from __future__ import annotations

import pytest
from builders import PUBMEDQA
from trainkit import tiny_cfg

import peftlab.recipes.precision_check as pc
import peftlab.train.measured_precision as mp
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json
from peftlab.core.result import read_result
from peftlab.recipes.train_run import run_training


@pytest.fixture
def home(monkeypatch, tmp_path):
    """The precision probe on (bf16 simulated 2x faster than fp32), with its cache in a fresh folder."""
    monkeypatch.delenv("PEFTLAB_AUTO_PRECISION", raising=False)
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    real = mp._timed_pass

    def timed(loss_fn, dtype):
        return (1.0 if dtype is None else 0.5), real(loss_fn, dtype)[1]

    monkeypatch.setattr(mp, "_timed_pass", timed)
    return tmp_path


def _metrics(monkeypatch, values: dict[str, float]) -> list[str]:
    """Each check run's val metric by run name; returns the names of the runs that trained."""
    trained, real = [], pc.run_training

    def train(cfg, **kwargs):
        trained.append(cfg.name)
        return real(cfg, **kwargs)

    monkeypatch.setattr(pc, "run_training", train)
    monkeypatch.setattr(pc, "trial_value", lambda result, metric: values[result.name])
    return trained


def _auto(model, tmp, name: str, method: str = "lora"):
    return read_result(run_training(tiny_cfg(model, method, tmp / "runs", name, PUBMEDQA,
                                             "train.mixed_precision=auto"))).precision


def test_bf16_outside_the_fp32_spread_keeps_fp32_until_a_check_agrees(tiny_causal, home, monkeypatch):
    assert _auto(tiny_causal, home, "before")["autocast"] == "bf16"  # the one-batch probe alone picks bf16
    cfg = tiny_cfg(tiny_causal, "lora", home / "runs", "lora", PUBMEDQA)
    trained = _metrics(monkeypatch, {"fp32-seed0": 0.40, "fp32-seed1": 0.44, "fp32-seed2": 0.38, "bf16-seed0": 0.30})
    check = pc.check_precision(cfg, seeds=3)
    assert trained == ["fp32-seed0", "fp32-seed1", "fp32-seed2", "bf16-seed0"] and check.below
    assert check.reason == "bf16's val accuracy 0.3000 is below the fp32 seeds' 0.3800 to 0.4400 (3 seeds)"
    folder = home / "runs" / "lora-precision"
    assert read_json(folder / pc.CHECK_FILE)["below"] is True
    runs = {name: read_result(folder / name) for name in trained}
    assert runs["bf16-seed0"].precision["autocast"] == "bf16" and runs["fp32-seed2"].precision["autocast"] == "fp32"
    assert not any(k.startswith("test_") for r in runs.values() for k in r.metrics)  # the check never sees test

    after = _auto(tiny_causal, home, "after")
    assert after["autocast"] == "fp32" and after["source"] == "checked"
    assert after["reason"] == f"{check.reason}: keeping fp32 (peftlab precision)"
    assert _auto(tiny_causal, home, "other", "prompt-tuning")["autocast"] == "bf16"  # the verdict is LoRA's only

    trained.clear()  # a second check reuses the finished runs; here bf16 falls inside the spread
    _metrics(monkeypatch, {"fp32-seed0": 0.40, "fp32-seed1": 0.44, "fp32-seed2": 0.38, "bf16-seed0": 0.41})
    assert not pc.check_precision(cfg, seeds=3).below and trained == []
    assert _auto(tiny_causal, home, "again")["autocast"] == "bf16"


def test_a_check_needs_a_spread_and_a_method_that_trains(tiny_causal, tmp_path):
    with pytest.raises(PeftlabError, match="--seeds: a spread needs at least 2 fp32 seeds, got 1"):
        pc.check_precision(tiny_cfg(tiny_causal, "lora", tmp_path), seeds=1)
    with pytest.raises(PeftlabError, match="method.name: linear-head trains no weights by gradient"):
        pc.check_precision(tiny_cfg(tiny_causal, "linear-head", tmp_path), seeds=3)


def test_a_check_refuses_finished_runs_of_another_config(tiny_causal, tmp_path, monkeypatch):
    _metrics(monkeypatch, {"fp32-seed0": 0.4, "fp32-seed1": 0.4, "bf16-seed0": 0.4})
    pc.check_precision(tiny_cfg(tiny_causal, "lora", tmp_path, "check"), seeds=2)
    with pytest.raises(PeftlabError, match=r"fp32-seed0: trained with train.lr None, this check has 0.001; delete "):
        pc.check_precision(tiny_cfg(tiny_causal, "lora", tmp_path, "check", PUBMEDQA, "train.lr=1e-3"), seeds=2)
