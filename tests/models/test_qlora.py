"""QLoRA: LoRA over a bitsandbytes-quantized frozen base; a clear error where bitsandbytes cannot run; a merge that
gives a full-precision model; studies that list an impossible run instead of failing."""

from __future__ import annotations

import importlib.util
import json
import sys

import pandas as pd
import pytest
import torch
from builders import PUBMEDQA
from trainkit import adapt, sharpen, tiny_cfg, train_losses

from peftlab.cli import main
from peftlab.core.errors import NotSupported
from peftlab.core.files import read_json
from peftlab.models.quant import check_available, quantized_placement
from peftlab.prompts.encoding import format_for
from peftlab.recipes.train_run import run_training
from peftlab.report.notes import memory_notes, not_run, notes_markdown


def _bitsandbytes_skip_reason() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'peftlab[qlora]')"
    try:
        check_available(torch.device("cpu"))
    except NotSupported as err:
        return str(err)
    return None


needs_bnb = pytest.mark.skipif(_bitsandbytes_skip_reason() is not None, reason=str(_bitsandbytes_skip_reason()))


def test_missing_bitsandbytes_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"bitsandbytes"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(NotSupported, match=r"needs bitsandbytes, which is not installed; run: pip install "
                                           r"'peftlab\[qlora\]'"):
        quantized_placement("nf4", torch.device("cpu"), torch.float32)


@needs_bnb
def test_device_without_a_backend_is_named(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(NotSupported, match="has no backend for device 'cpu' .*supports cuda"):
        check_available(torch.device("cpu"))


def test_train_command_records_not_run_and_exits_3(monkeypatch, tmp_path, tiny_causal, capsys):
    """`peftlab train` of an impossible run: one error line, exit code 3, and not_run.json for the study report."""
    import peftlab.recipes.train_run as train_mod

    def refuse(cfg, on_epoch_end=None):
        raise NotSupported("method qlora needs bitsandbytes, which is not installed")

    monkeypatch.setattr(train_mod, "run_training", refuse)
    cfg = tiny_cfg(tiny_causal, "qlora", tmp_path / "study", "qlora")
    from peftlab.core.config import save_config

    save_config(cfg, tmp_path / "qlora.yaml")
    monkeypatch.setattr(sys, "argv", ["peftlab", "train", str(tmp_path / "qlora.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
    assert capsys.readouterr().err.strip() == "error: method qlora needs bitsandbytes, which is not installed"
    assert not_run(tmp_path / "study") == [{"name": "qlora", "method": "qlora",
                                            "reason": "method qlora needs bitsandbytes, which is not installed"}]
    assert "- qlora (qlora): method qlora needs bitsandbytes" in notes_markdown(tmp_path / "study", pd.DataFrame())


def test_memory_note_compares_qlora_with_lora():
    df = pd.DataFrame([
        {"name": "lora", "method": "lora", "model": "m", "task": "t", "peak_rss_mb": 1000.0, "peak_gpu_mb": None},
        {"name": "qlora", "method": "qlora", "model": "m", "task": "t", "peak_rss_mb": 750.0, "peak_gpu_mb": None},
        {"name": "q-other", "method": "qlora", "model": "other", "task": "t", "peak_rss_mb": 1.0},
    ])
    assert memory_notes(df) == ["qlora (qlora) against lora (LoRA over the unquantized base): peak RSS 750 MB vs "
                                "1,000 MB, 250 MB (25%) less."]
    df["peak_gpu_mb"] = [400.0, 100.0, None]
    assert "peak GPU memory allocated 100 MB vs 400 MB, 300 MB (75%) less" in memory_notes(df)[0]
    df["peak_gpu_mb"] = None
    df["peak_rss_mb"] = [1000.0, 1100.0, 1.0]
    df["weights_mb"] = [513.0, 159.0, 1.0]
    assert memory_notes(df)[0].endswith("peak RSS 1,100 MB vs 1,000 MB, 100 MB (10%) more; weights 159 MB vs 513 MB.")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A 2-layer Llama 64 wide: bitsandbytes' CPU 4-bit inference kernel packs inputs in blocks of 64 features, so
    conftest's 32-wide model is too narrow for it (real models are hundreds wide)."""
    from builders import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama64")
    tok = build_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sharp_causal(llama64, tmp_path_factory):
    # Confident logits from large embeddings (which stay full precision), modest quantized layers: quantization
    # then moves the logits less than a few LoRA steps do, so the merge check below can tell the two apart.
    return sharpen(llama64, tmp_path_factory.mktemp("sharp-llama64"), "causal", 0.3, 0.02)


@needs_bnb
@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_qlora_trains_over_a_quantized_frozen_base(quant, layer, llama64, tmp_path, monkeypatch):
    import peftlab.recipes.train_run as train_mod

    seen = {}
    original = train_mod.count_params

    def recording(model):  # the model as training gets it: quantized base layers, trainable LoRA weights only
        seen["layers"] = {type(m).__name__ for m in model.modules()}
        seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return original(model)

    monkeypatch.setattr(train_mod, "count_params", recording)
    run_dir = run_training(tiny_cfg(llama64, "qlora", tmp_path, None, PUBMEDQA, f"method.quant={quant}"))
    assert layer in seen["layers"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    result = read_json(run_dir / "result.json")
    fp32 = read_json(run_training(tiny_cfg(llama64, "lora", tmp_path, "lora", PUBMEDQA)) / "result.json")
    assert result["total_params"] == fp32["total_params"]  # 4-bit weights counted at their real number
    assert result["trainable_params"] == fp32["trainable_params"]
    assert len(train_losses(run_dir)) == 2 and result["adapter_bytes"] > 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # A run is a model: reloaded over a base quantized the same way, it scores its test split as it did in training.
    from peftlab.recipes.eval_run import EvalOptions, eval_run

    metrics = eval_run(run_dir, EvalOptions(device="cpu"), tmp_path / "eval")
    assert metrics["accuracy"] == result["metrics"]["test_accuracy"]


@needs_bnb
def test_merged_qlora_is_full_precision_and_matches_within_quantization_error(sharp_causal, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftlab.data.splits import load_splits
    from peftlab.data.tasks import get_task
    from peftlab.deploy.export import merge_run
    from peftlab.models.adapters import load_adapter
    from peftlab.models.forward import target_logits
    from peftlab.models.loading import load_model
    from peftlab.prompts.batches import collate
    from peftlab.prompts.encoding import encode_split

    cfg = tiny_cfg(sharp_causal, "qlora", tmp_path, None, PUBMEDQA, "train.lr=5e-2", "train.max_steps=8")
    run_dir = run_training(cfg)
    out = merge_run(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert {type(m).__name__ for m in merged.modules()}.isdisjoint({"Linear4bit", "Linear8bitLt"})

    task = get_task("pubmedqa")
    quantized = load_model(str(sharp_causal), device="cpu", quantize="nf4")
    fmt = format_for(quantized)
    batch = collate(encode_split(cfg.data, task, fmt, load_splits(cfg.data, task)["test"]), "causal", 0)

    def logits(model):
        with torch.inference_mode():
            return target_logits(model.eval(), "causal", batch).float()

    fp32 = load_model(str(sharp_causal), device="cpu")
    base_fp32 = logits(fp32.model)
    base_4bit = logits(quantized.model)  # before load_adapter, which injects the adapter into this very module
    quantization_error = (base_4bit - base_fp32).abs().max()
    unmerged = logits(load_adapter(quantized, run_dir))  # what training saw: the 4-bit base plus the adapter
    merged_logits = logits(merged)
    # The merge itself is exact: the fp32 base with the adapter applied unmerged gives the same logits.
    assert torch.allclose(merged_logits, logits(load_adapter(fp32, run_dir)), atol=1e-4)
    # Against the trained 4-bit model the merged one differs by the 4-bit rounding, which the adapter learned around
    # and which grows with it: measured 0.50 in max logit for an adapter that moved the logits by 11.5, where
    # quantizing the untrained base moved them by 0.03. The tolerance: within 10% of what training changed.
    trained_effect = (unmerged - base_4bit).abs().max()
    merge_error = (merged_logits - unmerged).abs().max()
    assert trained_effect > 30 * quantization_error, (trained_effect, quantization_error)  # the adapter matters
    assert merge_error <= 0.1 * trained_effect, (merge_error, trained_effect)


def test_study_lists_qlora_as_not_run_where_bitsandbytes_is_missing(tmp_path, tiny_causal, small_pubmedqa,
                                                                   monkeypatch):
    """A real study whose run processes cannot import bitsandbytes: the qlora run is listed, the study succeeds."""
    import yaml

    from peftlab.recipes.compare import run_study

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None  # find_spec -> None\n")
    monkeypatch.setenv("PYTHONPATH", str(hide))
    study = {"name": "s", "output_dir": str(tmp_path / "runs"),
             "base": {"model": {"name": str(tiny_causal)}, "data": {"path": str(small_pubmedqa), "limit_eval": 4},
                      "train": {"max_steps": 1, "threads": 1}},
             "runs": [{"name": "zs", "method": {"name": "zero-shot"}}, {"name": "qlora", "method": {"name": "qlora"}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    study_dir = run_study(path)
    assert (study_dir / "zs" / "result.json").exists() and not (study_dir / "qlora" / "result.json").exists()
    results = (study_dir / "results.md").read_text()
    assert "Not run here:\n\n- qlora (qlora): method qlora needs bitsandbytes, which is not installed" in results
    assert "qlora" in (study_dir / "report.html").read_text()


@needs_bnb
def test_evaluation_between_epochs_keeps_qlora_gradients(llama64):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval pass; training after it must still get
    the same gradients (the input gradient through a repacked layer would be lost)."""
    from peftlab.core.config import MethodConfig
    from peftlab.data.tasks import get_task
    from peftlab.models.forward import target_logits, target_loss
    from peftlab.models.loading import load_model
    from peftlab.prompts.batches import collate
    from peftlab.prompts.encoding import encode

    loaded = load_model(str(llama64), device="cpu", quantize="nf4")
    task = get_task("pubmedqa")
    model = adapt(loaded, task, MethodConfig(name="qlora", dropout=0.0))
    fmt = format_for(loaded)
    batch = collate([encode(task, e, fmt, 128) for e in task.load(PUBMEDQA)[:4]], "causal", 0)

    def gradients() -> dict:
        model.train()
        model.zero_grad()
        target_loss(model, "causal", batch)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.inference_mode():
        target_logits(model, "causal", batch)
    after = gradients()
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
