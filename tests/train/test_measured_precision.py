"""`train.mixed_precision: auto` on a CPU: bf16 only where this machine measures it faster and its loss agrees;
the timing is simulated here (the bench measures it for real), and the probe leaves no trace on the run."""

from __future__ import annotations

import pytest
from builders import PUBMEDQA
from trainkit import tiny_cfg, train_losses

import peftlab.recipes.train_run as train_run
import peftlab.train.measured_precision as mp
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json
from peftlab.core.result import read_result
from peftlab.recipes.train_run import run_training


def test_bf16_only_where_it_is_faster_and_agrees():
    slow = mp.decide(fp32_s=1.0, bf16_s=1.9, fp32_loss=2.0, bf16_loss=2.0)  # an Intel core without AMX: 0.52x
    assert slow.autocast == "fp32"
    assert slow.reason == "bf16 measured 0.53x fp32 on this CPU, under the 1.2x it must gain"
    small = mp.decide(fp32_s=1.0, bf16_s=0.9, fp32_loss=2.0, bf16_loss=2.0)  # 1.11x: not worth its rounding
    assert small.autocast == "fp32"
    off = mp.decide(fp32_s=2.0, bf16_s=1.0, fp32_loss=2.0, bf16_loss=2.2)  # fast, but the loss moved 10%
    assert off.autocast == "fp32" and "differs from fp32's by 10.0%" in off.reason
    assert mp.decide(2.0, 1.0, 2.0, float("nan")).autocast == "fp32"
    fast = mp.decide(fp32_s=2.19, bf16_s=1.0, fp32_loss=2.0, bf16_loss=2.004)  # a Zen 4's AVX512_BF16
    assert fast.autocast == "bf16" and fast.speedup == pytest.approx(2.19) and fast.dtype is not None


def test_bf16_val_below_every_fp32_seed_keeps_fp32_and_nothing_else_does():
    assert mp.below_seeds(0.41, [0.40, 0.44, 0.38], "macro_f1") == (
        False, "bf16's val macro_f1 0.4100 is within the fp32 seeds' 0.3800 to 0.4400 (3 seeds)")
    assert not mp.below_seeds(0.38, [0.40, 0.38], "accuracy")[0]  # the spread's ends are inside
    assert mp.below_seeds(0.3799, [0.40, 0.38], "accuracy") == (
        True, "bf16's val accuracy 0.3799 is below the fp32 seeds' 0.3800 to 0.4000 (2 seeds)")
    assert mp.below_seeds(0.45, [0.40, 0.44], "accuracy") == (  # better than every seed: no reason to give it up
        False, "bf16's val accuracy 0.4500 is above the fp32 seeds' 0.4000 to 0.4400 (2 seeds)")
    with pytest.raises(ValueError, match="at least 2 fp32 seeds"):
        mp.below_seeds(0.4, [0.4], "accuracy")


def test_the_scoring_probe_must_be_able_to_pay_for_itself():
    # 64 items in fp32 and bf16, 8 timed 4-row batches: 160 items' work; bf16 saves at most 54% of an item.
    assert mp.scoring_probe_items(4) == 295
    assert mp.scoring_probe_items(64) > mp.scoring_probe_items(1)  # short prompts: wide timed batches


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """The probe on, with its cache in a fresh folder."""
    monkeypatch.delenv("PEFTLAB_AUTO_PRECISION", raising=False)
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    return tmp_path


def _simulate(monkeypatch, bf16_speed: float) -> list:
    """Real passes (the probe runs the model), with bf16's time set to fp32's / `bf16_speed`."""
    real, calls = mp._timed_pass, []

    def timed(loss_fn, dtype):
        seconds, loss = real(loss_fn, dtype)
        calls.append(dtype)
        return (1.0 if dtype is None else 1.0 / bf16_speed), loss

    monkeypatch.setattr(mp, "_timed_pass", timed)
    return calls


def _lora(model, tmp, name: str, precision: str):
    return run_training(tiny_cfg(model, "lora", tmp / "runs", name, PUBMEDQA, f"train.mixed_precision={precision}"))


def test_auto_where_bf16_is_slower_keeps_fp32_says_why_and_trains_as_without_the_probe(tiny_causal, measured,
                                                                                        monkeypatch):
    calls = _simulate(monkeypatch, bf16_speed=0.5)
    run = _lora(tiny_causal, measured, "auto", "auto")
    precision = read_result(run).precision
    assert precision["autocast"] == "fp32" and precision["source"] == "measured" and len(calls) == 2
    assert precision["reason"] == "bf16 measured 0.50x fp32 on this CPU, under the 1.2x it must gain"
    plain = _lora(tiny_causal, measured, "no", "no")
    assert train_losses(run) == train_losses(plain)  # gradients cleared and the random state put back
    assert read_result(plain).precision["source"] == "configured"

    again = _lora(tiny_causal, measured, "again", "auto")
    assert read_result(again).precision["source"] == "cached" and len(calls) == 2  # measured once per machine


def test_auto_where_bf16_is_faster_trains_in_bf16(tiny_causal, measured, monkeypatch):
    _simulate(monkeypatch, bf16_speed=2.0)
    run = _lora(tiny_causal, measured, "auto", "auto")
    precision = read_result(run).precision
    assert precision["autocast"] == "bf16" and precision["speedup"] == pytest.approx(2.0)
    bf16 = _lora(tiny_causal, measured, "bf16", "bf16")
    assert train_losses(run) == train_losses(bf16)  # the same training as asking for bf16


def test_scoring_keeps_fp32_unless_bf16_is_faster_with_every_answer_the_same():
    assert mp.decide_scoring(fp32_s=1.0, bf16_s=0.95, changed=0, rows=64).reason == (
        "bf16 scoring measured 1.05x fp32 on this CPU, under the 1.2x it must gain")
    changed = mp.decide_scoring(fp32_s=1.3, bf16_s=1.0, changed=3, rows=64)  # SmolLM2 on PubMedQA, measured
    assert changed.autocast == "fp32" and changed.answers_changed == 3
    assert changed.reason == "bf16 scoring is 1.30x fp32 here, but it changed 3 of 64 probe answers"
    assert mp.decide_scoring(fp32_s=1.5, bf16_s=1.0, changed=0, rows=64).autocast == "bf16"


def _simulate_scoring(monkeypatch, bf16_speed: float, flip: bool = False) -> list:
    """Real forwards, with bf16's time set to fp32's / `bf16_speed` (and, with `flip`, one answer changed)."""
    seconds, answers, calls = mp._seconds, mp._answers, []

    def timed(forward, bf16):
        seconds(forward, bf16)
        calls.append(bf16)
        return 1.0 / bf16_speed if bf16 else 1.0

    def answered(score, bf16):
        out = answers(score, bf16)
        if bf16 and flip:
            out = out.clone()
            out[0] += 1  # the first probe item's answer changes
        return out

    monkeypatch.setattr(mp, "_seconds", timed)
    monkeypatch.setattr(mp, "_answers", answered)
    monkeypatch.setattr(train_run, "scoring_probe_items", lambda rows: 0)  # the tiny runs score a few items
    return calls


@pytest.mark.parametrize("task", ["pubmedqa", "dialogsum"])
def test_auto_scores_in_bf16_where_measured_faster_and_says_so(tiny_causal, measured, monkeypatch, task,
                                                               small_dialogsum):
    calls = _simulate_scoring(monkeypatch, bf16_speed=1.5)
    data = PUBMEDQA if task == "pubmedqa" else small_dialogsum
    run = run_training(tiny_cfg(tiny_causal, "zero-shot", measured / "runs", task, data, f"data.task={task}",
                                "train.mixed_precision=auto", "data.limit_eval=3"))
    choice = read_result(run).scoring_precision
    assert choice["autocast"] == "bf16" and choice["speedup"] == pytest.approx(1.5) and calls == [False, True]
    assert "test_accuracy" in read_result(run).metrics or "test_rouge1" in read_result(run).metrics


def test_auto_keeps_fp32_scoring_where_bf16_changes_an_answer_and_scores_as_without_the_probe(
        tiny_causal, measured, monkeypatch):
    _simulate_scoring(monkeypatch, bf16_speed=2.0, flip=True)
    run = run_training(tiny_cfg(tiny_causal, "lora", measured / "runs", "auto", PUBMEDQA,
                                "train.mixed_precision=auto"))
    choice = read_result(run).scoring_precision
    assert choice["autocast"] == "fp32" and choice["answers_changed"] == 1 and "changed 1 of" in choice["reason"]
    plain = run_training(tiny_cfg(tiny_causal, "lora", measured / "runs", "no", PUBMEDQA, "train.mixed_precision=no"))
    assert read_result(plain).scoring_precision["source"] == "configured"
    assert read_result(run).metrics == read_result(plain).metrics


def test_an_unwritable_cache_costs_a_probe_per_run_and_a_check_says_it_was_not_recorded(tiny_causal, measured,
                                                                                       monkeypatch):
    blocker = measured / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFTLAB_HOME", str(blocker / "home"))  # under a file: no folder can be made there
    calls = _simulate(monkeypatch, bf16_speed=0.5)
    first, second = (read_result(_lora(tiny_causal, measured, name, "auto")).precision for name in ("a", "b"))
    assert first["source"] == second["source"] == "measured" and len(calls) == 4  # measured again, no error
    with pytest.raises(PeftlabError, match="precision.json: .*the precision check was not recorded; set PEFTLAB_HOME"):
        mp.keep_fp32("model | lora", "bf16's val accuracy 0.3 is outside the fp32 seeds' 0.4 to 0.5 (3 seeds)")


def test_a_run_too_small_for_the_scoring_probe_to_pay_back_scores_in_fp32_unless_a_probe_is_cached(
        tiny_causal, measured, monkeypatch):
    calls = _simulate_scoring(monkeypatch, bf16_speed=2.0)
    monkeypatch.setattr(train_run, "scoring_probe_items", lambda rows: 5)

    def zero_shot(name: str):
        return read_result(run_training(tiny_cfg(tiny_causal, "zero-shot", measured / "runs", name, PUBMEDQA,
                                                 "train.mixed_precision=auto", "data.limit_eval=2")))

    small = zero_shot("small").scoring_precision  # 2 test items and 2 val
    assert small["autocast"] == "fp32" and small["source"] == "not measured" and calls == []
    assert small["reason"].startswith("this run scores 4 items, under the 5 on which the scoring probe (64 items in "
                                      "fp32 and in bf16, and timed batches of ")
    monkeypatch.setattr(train_run, "scoring_probe_items", lambda rows: 0)
    assert zero_shot("probed").scoring_precision["autocast"] == "bf16" and calls == [False, True]
    monkeypatch.setattr(train_run, "scoring_probe_items", lambda rows: 5)
    again = zero_shot("again").scoring_precision  # as small, but the probe's answer is known: it costs nothing
    assert again["autocast"] == "bf16" and again["source"] == "cached" and calls == [False, True]


def test_a_cut_off_cache_is_measured_again_and_rewritten(tiny_causal, measured, monkeypatch):
    home = measured / "home"
    home.mkdir()
    (home / mp.CACHE_FILE).write_text('{"AMD EPYC | torch')  # a write cut off mid-way
    calls = _simulate(monkeypatch, bf16_speed=0.5)
    assert read_result(_lora(tiny_causal, measured, "a", "auto")).precision["source"] == "measured" and calls
    assert read_json(home / mp.CACHE_FILE)  # readable again, with this measurement in it
