"""The named peft variants and the pass-through of any peft config.

Each named variant trains (two steps, a finite loss that falls, a result row with its parameters and bytes), saves
an adapter that plain `PeftModel.from_pretrained` reloads to the same logits, merges where peft can (otherwise a
one-line refusal) and is served by `peftlab serve`'s adapter pool; on the tiny Llama and the tiny T5.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from builders import PUBMEDQA
from trainkit import adapt, sharpen, tiny_cfg, train_losses

from peftlab.core.config import MethodConfig, load_config, save_config
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.core.files import read_json
from peftlab.data.tasks import get_task
from peftlab.deploy.export import merged_model
from peftlab.deploy.serve import AdapterPool
from peftlab.methods.registry import (
    METHODS,
    NAMED_VARIANTS,
    count_params,
    plain_path_reason,
    save_adapter,
)
from peftlab.models.loading import load_model
from peftlab.recipes.runner import load_run_config
from peftlab.recipes.train_run import run_training

NAMED = [m.name for m in NAMED_VARIANTS]
KINDS = ["causal", "seq2seq"]
TASK = get_task("pubmedqa")


@pytest.fixture(scope="module")
def sharp(tiny_causal, tiny_seq2seq, tmp_path_factory):
    """Tiny models with confident outputs, which two steps of an adapter visibly move (`trainkit.sharpen`).

    T5's dropout is off: with it, two steps' losses differ by up to 0.8 whatever the adapter does.
    """
    t5 = sharpen(tiny_seq2seq, tmp_path_factory.mktemp("sharp-t5"), "seq2seq", 3.0, 0.3)
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    return {"causal": sharpen(tiny_causal, tmp_path_factory.mktemp("sharp-llama"), "causal", 0.3, 0.3),
            "seq2seq": t5}


# Learning rates for two visible steps on a random tiny model, as multiples of each default: 10x, more where the
# adapter starts as an exact no-op with small gradients (AdaLoRA's zero singular values, VeRA, LoHa), less where
# the default is already large (LN-tuning, FourierFT).
LR_MULT = {"adalora": 1000, "vera": 50, "loha": 50, "lily": 50, "dora": 50, "boft": 50, "ln-tuning": 1,
           "fourierft": 0.01}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", NAMED)
def test_variant_trains_two_steps_and_reports_its_size(method, kind, sharp, tmp_path):
    lr = LR_MULT.get(method, 10) * METHODS[method].default_lr
    run_dir = run_training(tiny_cfg(sharp[kind], method, tmp_path, None, PUBMEDQA, f"train.lr={lr}",
                                    "method.dropout=0"))
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0], losses
    result = read_json(run_dir / "result.json")
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["adapter_bytes"] == sum(f.stat().st_size for f in (run_dir / "adapter").glob("*.safetensors")) > 0
    assert result["plain_path"] == plain_path_reason(METHODS[method], MethodConfig(name=method))
    assert (result["plain_path"] is None) == (method != "lily")


def _randomise(model: torch.nn.Module) -> None:
    """Move every trainable weight off its init (zero B matrices, identity rotations), so reloads have teeth."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model, kind: str) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 60, 99, 140, 23, 8, 301], [41, 42, 43, 44, 45, 46, 47, 48]])
    with torch.no_grad():
        if kind == "seq2seq":
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


NO_MERGE = {"lily"}  # its router mixes experts by the batch's tokens: no fixed weight to fold in


def _plain_base(path, kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", NAMED)
def test_variant_reloads_with_plain_peft_merges_and_serves(method, kind, tiny_causal, tiny_seq2seq, tmp_path):
    from peft import PeftModel

    path = tiny_causal if kind == "causal" else tiny_seq2seq
    cfg = tiny_cfg(path, method, tmp_path)
    loaded = load_model(str(path), device="cpu")
    torch.manual_seed(0)
    model = adapt(loaded, TASK, cfg.method)
    _randomise(model)
    model.eval()
    want = _logits(model, kind)
    save_config(cfg, cfg.run_dir / "config.yaml")
    save_adapter(model, cfg.run_dir / "adapter")  # PiSSA/OLoRA: converted to the LoRA that fits the original base

    reloaded = PeftModel.from_pretrained(_plain_base(path, kind), cfg.run_dir / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded, kind), want, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(_plain_base(path, kind), kind), want, atol=1e-3)  # the adapter matters

    if method in NO_MERGE:
        with pytest.raises(PeftlabError, match="cannot be merged") as err:
            merged_model(cfg.run_dir)
        assert "\n" not in str(err.value)
    else:
        # Folded into the weights, the update is summed in another order: FourierFT's large dense update (scale
        # 150) moves T5's logits by up to 4e-4 that way; a wrong merge would move them by whole units.
        torch.testing.assert_close(_logits(merged_model(cfg.run_dir).model, kind), want, rtol=1e-3, atol=1e-3)

    pool = AdapterPool(load_model(str(path), device="cpu"), {"a": cfg.run_dir / "adapter"})
    prompt = [5, 17, 60, 99, 140]
    served = pool.generate("a", prompt, 4).token_ids
    out = reloaded.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                            max_new_tokens=4, do_sample=False, eos_token_id=pool.fmt.stop_token_ids,
                            pad_token_id=pool.fmt.tokenizer.pad_token_id)[0]
    assert served == (out[5:] if kind == "causal" else out[1:]).tolist()


def _fields(config) -> dict:
    """The fields of a peft config that differ from its class defaults, as YAML would give them."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name in ("peft_type", "task_type", "base_model_name_or_path", "revision"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(config, f.name)
        if value != default:
            out[f.name] = sorted(value) if isinstance(value, set) else value
    return out


@pytest.mark.parametrize("method", NAMED)
def test_peft_fields_give_the_named_methods_adapter(method, tiny_causal):
    torch.manual_seed(0)
    named = adapt(load_model(str(tiny_causal), device="cpu"), TASK, MethodConfig(name=method))
    config = named.peft_config["default"]
    raw = {"name": "peft", "peft": {"peft_type": config.peft_type.value, **_fields(config)}}
    cfg = load_config(None, base={"method": json.loads(json.dumps(raw))})  # what a YAML file can hold
    torch.manual_seed(0)
    via_peft = adapt(load_model(str(tiny_causal), device="cpu"), TASK, cfg.method)
    assert type(via_peft.peft_config["default"]) is type(config)
    assert count_params(via_peft) == count_params(named)


def test_a_saved_peft_config_runs_unchanged(tiny_causal, tmp_path):
    """An adapter_config.json (as in peft's method_comparison/ experiments) is a method, trainable again."""
    named = adapt(load_model(str(tiny_causal), device="cpu"), TASK, MethodConfig(name="vera", r=16))
    named.save_pretrained(tmp_path / "exp")
    saved = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert saved["inference_mode"] is True  # a saved config records inference mode; peftlab trains it anyway
    # A field another peft version has and this one lacks: dropped at its empty default, an error when set.
    (tmp_path / "exp" / "adapter_config.json").write_text(json.dumps({**saved, "future_field": None}))
    cfg = load_config(None, ["method.name=peft", f"method.peft_config={tmp_path / 'exp'}"])
    via_file = adapt(load_model(str(tiny_causal), device="cpu"), TASK, cfg.method)
    assert count_params(via_file) == count_params(named) and count_params(via_file)[0] > 0
    (tmp_path / "exp" / "adapter_config.json").write_text(json.dumps({**saved, "future_field": 3}))
    with pytest.raises(PeftlabError, match="unknown field 'future_field' in .*exp for VeraConfig"):
        load_run_config(None, ["method.name=peft", f"method.peft_config={tmp_path / 'exp'}"])


@pytest.mark.parametrize("overrides, message", [
    (["method.name=peft", "method.peft={peft_type: VERA, rr: 4}"], "unknown config key 'method.peft.rr' for Vera"),
    (["method.name=peft", "method.peft={peft_type: NOPE}"], "unknown peft_type 'NOPE'"),
    (["method.name=peft"], "needs method.peft.peft_type"),
    (["method.name=dora", "method.peft=[1]"], "method.peft: expected a mapping, got a list"),
    (["method.name=peft", "method.peft_config=missing.json"], "missing.json: no such peft config"),
])
def test_bad_peft_fields_fail_at_config_load_in_one_line(overrides, message):
    with pytest.raises(PeftlabError, match=message) as err:
        load_run_config(None, overrides)  # core's load_config, then the method stage's check of the peft fields
    assert "\n" not in str(err.value)


def test_bad_fields_on_a_named_method_and_a_wrong_task_type_fail_before_training(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(PeftlabError, match="unknown config key 'method.peft.lora_alph' for LoraConfig"):
        adapt(loaded, TASK, MethodConfig(name="dora", peft={"lora_alph": 4}))
    with pytest.raises(PeftlabError, match="task_type is SEQ_2_SEQ_LM but .* is a causal model"):
        adapt(loaded, TASK, MethodConfig(name="peft", peft={"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM"}))


def test_a_tuner_peft_cannot_apply_is_not_run_here(tiny_causal):
    # C3A's default 256-wide circulant blocks do not divide the tiny model's 32-wide projections.
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(NotSupported, match="peft does not support method 'peft'") as err:
        adapt(loaded, TASK, MethodConfig(name="peft", peft={"peft_type": "C3A", "target_modules": ["q_proj"]}))
    assert "\n" not in str(err.value)


def test_an_unchecked_tuner_runs_the_plain_path_and_says_so(tiny_causal, tmp_path):
    run_dir = run_training(tiny_cfg(tiny_causal, "peft", tmp_path, None, PUBMEDQA,
                                    "method.peft={peft_type: ROAD, group_size: 8}"))
    result = read_json(run_dir / "result.json")
    assert result["plain_path"].startswith("ROAD: not checked") and result["trainable_params"] > 0
    assert len(train_losses(run_dir)) == 2


def test_adalora_follows_the_runs_step_count(tiny_causal, tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    steps = []
    real = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", lambda self, step: (steps.append(step), real(self, step)))
    run_dir = run_training(tiny_cfg(tiny_causal, "adalora", tmp_path, None, PUBMEDQA, "train.max_steps=6",
                                    "train.batch_size=2", "method.peft={tinit: 1, tfinal: 2}"))
    assert steps == [0, 1, 2, 3, 4, 5]  # once per optimizer step, with the step's index
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == 6 and saved["rank_pattern"]
    kept = sum(sum(mask) for mask in saved["rank_pattern"].values())
    assert kept <= 8 * len(saved["rank_pattern"])  # pruned from 12 per layer to the target budget of r=8


def test_pissa_init_counts_in_the_runs_time(tiny_causal, tmp_path, monkeypatch):
    import time

    from peft.tuners.lora.layer import LoraLayer

    real = LoraLayer.pissa_init
    slow = {"done": False}

    def pissa_init(self, *args, **kwargs):
        if not slow["done"]:  # one slow SVD stands for a real model's: it must land inside the run's time
            slow["done"] = True
            time.sleep(3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "pissa_init", pissa_init)
    result = read_json(run_training(tiny_cfg(tiny_causal, "pissa", tmp_path)) / "result.json")
    assert slow["done"] and result["wall_seconds"] >= 3
