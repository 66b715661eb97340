"""Methods: how each adapts the model, and that each one actually learns (halves its loss on 8 examples)."""

from __future__ import annotations

import pytest
from builders import PUBMEDQA
from trainkit import adapt, sharpen, tiny_cfg, train_losses

from peftlab.core.config import MethodConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import get_task
from peftlab.methods.registry import METHODS, count_params, get_method
from peftlab.models.loading import load_model
from peftlab.recipes.train_run import run_training

# The original methods; the named peft variants and the `peft` pass-through are tested in test_variants.py.
CORE = {"zero-shot", "few-shot", "full", "lora", "qlora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning",
        "linear-head"}
TRAINABLE = [name for name, m in METHODS.items() if m.trains and name in CORE]
# QLoRA needs bitsandbytes and a base loaded quantized; tests/models/test_qlora.py covers it.
UNQUANTIZED = [name for name, m in METHODS.items() if not m.quantized and name in CORE]
# The linear head fits in closed form, with no gradient loop; tests/methods/test_head.py covers it.
GRADIENT = [name for name in TRAINABLE if METHODS[name].build is None]
VARIANTS = {"dora", "rslora", "pissa", "olora", "adalora", "vera", "loha", "lokr", "oft", "boft", "hra", "ln-tuning",
            "fourierft", "miss", "lily", "shira", "hira"}


def test_registry():
    assert set(METHODS) == CORE | VARIANTS | {"peft"} and len(METHODS) >= 20
    assert {name for name, m in METHODS.items() if m.trains} == set(METHODS) - {"zero-shot", "few-shot"}
    assert all(METHODS[name].lr_source and METHODS[name].peft_type for name in VARIANTS)
    with pytest.raises(PeftlabError, match="lora"):
        get_method("qlora-xl")


def test_each_entry_says_its_demos_and_where_its_training_is_saved():
    few, zero = get_method("few-shot"), get_method("zero-shot")
    assert (few.shots(0), few.shots(5), zero.shots(0), get_method("lora").shots(2)) == (3, 5, 0, 2)
    folders = {name: m.storage.folder for name, m in METHODS.items()}
    assert folders["full"] == "model" and folders["linear-head"] == "head"
    assert {name for name, folder in folders.items() if folder == "adapter"} == set(METHODS) - {
        "zero-shot", "few-shot", "full", "linear-head"}
    # What trains is saved; what trains nothing has nothing to save and scores with the base as it is.
    assert all((m.storage.save is not None) == m.trains for m in METHODS.values())


@pytest.mark.parametrize("name", [n for n in UNQUANTIZED if METHODS[n].build is None])
def test_apply_method_trainable_counts(name, tiny_model):
    loaded = load_model(str(tiny_model), device="cpu")
    base = loaded.num_params
    model = adapt(loaded, get_task("pubmedqa"), MethodConfig(name=name, num_virtual_tokens=4))
    trainable, total = count_params(model)
    if name in ("zero-shot", "few-shot"):
        assert trainable == 0 and total == base
    elif name == "full":
        assert trainable == total == base
    else:  # an adapter: a small part trains, the base is frozen and counted once
        assert 0 < trainable < base and total == base + trainable
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(any(k in n for k in ("lora_", "ia3_", "prompt_encoder")) for n in trained), trained


def test_lora_llama_names_map_to_t5(tiny_seq2seq):
    loaded = load_model(str(tiny_seq2seq), device="cpu")
    model = adapt(loaded, get_task("pubmedqa"), MethodConfig(name="lora", target_modules=["q_proj", "v_proj"]))
    assert set(model.peft_config["default"].target_modules) == {"q", "v"}


def test_unknown_target_module_is_an_error(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(PeftlabError, match="query_key_value"):
        adapt(loaded, get_task("pubmedqa"), MethodConfig(name="lora", target_modules=["query_key_value"]))


@pytest.fixture(scope="module")
def sharp_causal(tiny_causal, tmp_path_factory):
    return sharpen(tiny_causal, tmp_path_factory.mktemp("sharp-llama"), "causal", 0.3, 0.3)


@pytest.fixture(scope="module")
def sharp_seq2seq(tiny_seq2seq, tmp_path_factory):
    return sharpen(tiny_seq2seq, tmp_path_factory.mktemp("sharp-t5"), "seq2seq", 3.0, 0.3)


# Per-method settings that make 40 steps enough; every run sees the same 8 examples as one batch per step.
CAUSAL_SETTINGS = {
    "full": ["train.lr=3e-3"],
    "lora": ["train.lr=3e-2"],
    "ia3": ["train.lr=3e-1"],
    "prompt-tuning": ["train.lr=3e-1"],
    "prefix-tuning": ["train.lr=3e-1"],
    "p-tuning": ["train.lr=3e-2"],
}
# Soft prompts (prompt-tuning, P-tuning) barely move a random 2-layer T5 in 40 steps: the decoder sees them only
# through cross-attention, and prompt tuning is known to need scale (Lester et al., 2021). They are checked on the
# causal model; on T5 they only have to train (test_train.py).
SEQ2SEQ_SETTINGS = {
    "full": ["train.lr=3e-3"],
    "lora": ["train.lr=3e-2"],
    "ia3": ["train.lr=3e-1", "method.target_modules=[k,v,wo]"],
    "prefix-tuning": ["train.lr=3e-1"],
}
LEARN = [
    "train.max_steps=40", "train.batch_size=8", "train.warmup_ratio=0", "train.schedule=constant",
    "train.eval_every_epoch=false", "method.dropout=0",
]


def _halves(model, method, settings, tmp_path) -> None:
    run_dir = run_training(tiny_cfg(model, method, tmp_path, None, PUBMEDQA, *LEARN, *settings))
    losses = train_losses(run_dir)
    assert len(losses) == 40
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last <= first / 2, f"{method}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("method", sorted(CAUSAL_SETTINGS))
def test_method_learns_causal(method, sharp_causal, tmp_path):
    assert set(CAUSAL_SETTINGS) == set(GRADIENT) & set(UNQUANTIZED)
    _halves(sharp_causal, method, CAUSAL_SETTINGS[method], tmp_path)


@pytest.mark.parametrize("method", sorted(SEQ2SEQ_SETTINGS))
def test_method_learns_seq2seq(method, sharp_seq2seq, tmp_path):
    _halves(sharp_seq2seq, method, SEQ2SEQ_SETTINGS[method], tmp_path)
