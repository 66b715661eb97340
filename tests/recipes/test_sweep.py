"""Sweeps: search-space parsing, pruning, and a sweep that resumes after kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from builders import REPO

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.methods.registry import get_method
from peftlab.recipes.pruning import EpochPruner, Pruned
from peftlab.recipes.search import as_space, suggest
from peftlab.recipes.sweep import parse_sweep


def parse_space(space):
    return as_space(parse_sweep({"space": space}).space)


def test_parse_space_and_suggest():
    space = parse_space({
        "train.lr": {"low": 1e-3, "high": 0.1, "log": True},  # YAML 1.2 reads 1e-3 as this float (1.1: a string)
        "train.epochs": {"low": 1, "high": 3},
        "method.r": {"choices": [4, 8, 16]},
    })
    params = suggest(optuna.trial.FixedTrial({"train.lr": 0.01, "train.epochs": 2, "method.r": 8}), space)
    assert params == {"train.lr": 0.01, "train.epochs": 2, "method.r": 8}
    assert space["train.lr"]["low"] == 1e-3 and isinstance(space["train.epochs"]["low"], int)
    assert space["train.epochs"] == {"low": 1, "high": 3, "log": False, "step": None}  # every key, for suggest
    with pytest.raises(PeftlabError, match=r"^sweep\.space\.train\.lr: low must be below high, got 0\.1 and 0\.01$"):
        parse_space({"train.lr": {"low": 0.1, "high": 0.01}})
    with pytest.raises(PeftlabError, match="^sweep.space.train.lr.low: expected a number, got the text 'small'$"):
        parse_space({"train.lr": {"low": "small", "high": 0.01}})
    with pytest.raises(PeftlabError, match=r"^sweep\.space\.method\.r: expected \{choices: \[\.\.\.\]\} or"):
        parse_space({"method.r": [4, 8]})
    with pytest.raises(PeftlabError, match=r"^sweep\.space\.method\.r\.choices must hold at least 1 item, got \[\]$"):
        parse_space({"method.r": {"choices": []}})


def test_pruning_in_the_worker_judges_against_the_trials_finished_before_it():
    owner = optuna.create_study(direction="maximize")
    good = owner.ask()
    for epoch in (1, 2, 3):
        good.report(0.9, epoch)
    owner.tell(good, 0.9)
    finished = tuple(owner.get_trials())
    seen: dict[int, float] = {}
    bad = EpochPruner("median", startup_trials=1, last_epoch=3, finished=finished).callback(seen)
    with pytest.raises(Pruned, match="epoch 1: val_accuracy 0.1000 is below the median"):
        bad(1, {"val_loss": 2.0, "val_accuracy": 0.1})
    assert seen == {1: 0.1}  # the owner reports these to its study when the trial comes back
    last = EpochPruner("median", startup_trials=1, last_epoch=3, finished=finished).callback(seen := {})
    last(3, {"val_loss": 2.0, "val_accuracy": 0.1})  # at the final epoch the run is kept, whatever its value
    assert seen == {3: 0.1}
    early = EpochPruner("median", startup_trials=2, last_epoch=3, finished=finished).callback({})
    early(1, {"val_loss": 2.0, "val_accuracy": 0.1})  # one finished trial is not yet a median to prune against
    EpochPruner("none", finished=finished).callback({})(1, {"val_accuracy": 0.0})
    judged = EpochPruner("median", startup_trials=1, metric="macro_f1", finished=finished).callback(seen := {})
    judged(1, {"val_accuracy": 0.1, "val_macro_f1": 0.95})
    assert seen == {1: 0.95}


def _states(db) -> list[str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:  # not created yet, or locked by the writer for a moment
        return []


def test_sweep_resumes_after_kill(tiny_causal, small_pubmedqa, tmp_path):
    study = {
        "name": "sw",
        "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(tiny_causal), "device": "cpu"}, "method": {"name": "lora"},
                 "data": {"path": str(small_pubmedqa), "limit_train": 8, "limit_eval": 4},
                 "train": {"epochs": 1, "threads": 1}},
        "sweep": {"trials": 3, "seed": 0, "space": {"train.lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                                     "method.r": {"choices": [2, 4]}}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(study))
    study_dir = tmp_path / "runs" / "sw"
    db = study_dir / "optuna.db"
    cmd = [sys.executable, "-m", "peftlab", "sweep", str(path), "--trials", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while "COMPLETE" not in _states(db) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done_before = _states(db).count("COMPLETE")
    assert 1 <= done_before < 3, "the first process should be killed mid-sweep"
    kept = (study_dir / "trial-0" / "result.json").stat().st_mtime

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_before} of 3 trials finished" in rerun.stdout  # resumed, not restarted
    loaded = optuna.load_study(study_name="sw", storage=f"sqlite:///{db}")
    complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    assert (study_dir / "trial-0" / "result.json").stat().st_mtime == kept  # finished trials are not redone
    assert all((study_dir / f"trial-{t.number}" / "result.json").is_file() for t in complete)
    best = load_config(study_dir / "best_config.yaml")
    assert best.train.lr == pytest.approx(loaded.best_params["train.lr"])
    assert best.method.r == loaded.best_params["method.r"]
    assert (study_dir / "results.md").is_file()


def test_tune_section_parses_and_centres_lr_on_each_method():
    from peftlab.recipes.tuning import method_space, parse_tune

    spec = parse_tune({"trials": 3, "space": {"train.lr": {"factor": 10}},
                       "methods": {"lora": {"method.r": {"choices": [4, 8]}}},
                       "select": {"linear-head": {"method.head_c": [0.01, 0.1]}}})
    lora = method_space(spec, load_config(None, ["method.name=lora"]), get_method("lora"))
    assert lora["train.lr"]["low"] == pytest.approx(2e-5) and lora["train.lr"]["high"] == pytest.approx(2e-3)
    assert lora["train.lr"]["log"] and lora["method.r"] == {"choices": [4, 8]}
    # a set lr is the centre
    full = method_space(spec, load_config(None, ["method.name=full", "train.lr=1e-4"]), get_method("full"))
    assert full["train.lr"]["low"] == pytest.approx(1e-5) and "method.r" not in full
    with pytest.raises(PeftlabError, match="unknown study key 'tune.trails'; valid: methods, metric, pruner, seed"):
        parse_tune({"trails": 3})
    with pytest.raises(PeftlabError, match="^tune.select.few-shot.data.shots: expected a list, got the number 2$"):
        parse_tune({"select": {"few-shot": {"data.shots": 2}}})


def test_repeats_and_deterministic_methods():
    from peftlab.recipes.repeats import Repeats, parse_repeats, repeat_configs

    assert parse_repeats({"seeds": [0, 1]}) == Repeats(seeds=(0, 1))
    assert parse_repeats({"folds": 5}) == Repeats(folds=5)
    for bad in ({"seeds": []}, {"folds": 2}, {"seeds": [0], "folds": 3}, [0, 1]):
        with pytest.raises(PeftlabError, match="repeats"):
            parse_repeats(bad)
    lora = load_config(None, ["method.name=lora", "name=l"])
    assert [(c.name, c.train.seed) for c in repeat_configs(lora, Repeats(seeds=(0, 1)))] == [("l-seed0", 0),
                                                                                             ("l-seed1", 1)]
    zs = load_config(None, ["method.name=zero-shot", "name=z"])
    assert [c.name for c in repeat_configs(zs, Repeats(seeds=(0, 1)))] == ["z-seed0"]
    assert [(c.name, c.data.fold, c.data.folds) for c in repeat_configs(zs, Repeats(folds=3))] == [
        ("z-fold0", 0, 3), ("z-fold1", 1, 3), ("z-fold2", 2, 3)]


def test_sweep_trials_run_two_at_once_on_local_workers(tiny_causal, small_pubmedqa, tmp_path, capsys):
    from peftlab.recipes.sweep import run_sweep

    study = {"name": "par", "output_dir": str(tmp_path / "runs"),
             "base": {"model": {"name": str(tiny_causal), "device": "cpu"}, "method": {"name": "lora", "r": 2},
                      "data": {"path": str(small_pubmedqa), "limit_train": 8, "limit_eval": 4},
                      "train": {"epochs": 1}},
             "sweep": {"trials": 3, "seed": 0, "space": {"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}
    path = tmp_path / "par.yaml"
    path.write_text(yaml.safe_dump(study))
    study_dir = run_sweep(path, workers=2)
    out = capsys.readouterr().out
    assert out.index("trial-1 started") < out.index("trial-0 done")  # the second trial began before the first ended
    loaded = optuna.load_study(study_name="par", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    assert all((study_dir / f"trial-{n}" / "worker.log").is_file() for n in range(3))
    assert (study_dir / "best_config.yaml").is_file()
