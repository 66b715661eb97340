"""Training runs end to end: every method writes a complete run folder, saved adapters reload exactly, and runs
are reproducible."""

from __future__ import annotations

import json
import math

import pytest
import torch
from builders import PUBMEDQA
from trainkit import RESULT_KEYS, adapt, sharpen, tiny_cfg, train_losses

import peftlab.train.loop as train_mod
from peftlab.core.config import load_config
from peftlab.core.files import read_json
from peftlab.data.splits import load_splits
from peftlab.data.tasks import get_task
from peftlab.evaluate.scoring import label_scores
from peftlab.methods.registry import METHODS, get_method
from peftlab.models.forward import target_loss, weighted_targets
from peftlab.models.hf_folder import load_tokenizer
from peftlab.prompts.batches import collate
from peftlab.prompts.encoding import encode, encode_split
from peftlab.prompts.format import PromptFormat
from peftlab.prompts.weights import example_weights
from peftlab.recipes.train_run import run_training
from peftlab.train.runtime import precision

# QLoRA (a quantized base, bitsandbytes) and the linear head (no gradient loop) have their own tests in
# tests/models/test_qlora.py and tests/methods/test_head.py.
# `peft` (any peft config) needs its fields; tests/methods/test_variants.py runs it.
UNQUANTIZED = [name for name, m in METHODS.items() if not m.quantized and m.build is None and name != "peft"]
ADAPTERS = [name for name in UNQUANTIZED if METHODS[name].trains and name != "full"]


@pytest.mark.parametrize("method", UNQUANTIZED)
def test_every_method_writes_a_complete_run(method, tiny_model, tmp_path):
    extra = ["data.shots=1", "data.max_length=1024"] if method == "few-shot" else []
    run_dir = run_training(tiny_cfg(tiny_model, method, tmp_path, None, PUBMEDQA, "method.num_virtual_tokens=4",
                                    *extra))
    result = read_json(run_dir / "result.json")
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["method"] == method and result["total_params"] > 0
    assert {"torch", "transformers", "peft", "python"} <= set(result["versions"])
    assert result["peak_rss_mb"] > 0
    metrics = read_json(run_dir / "metrics.json")
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_n"] == 4 and "val_macro_f1" in metrics
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 4
    assert load_config(run_dir / "config.yaml") == tiny_cfg(tiny_model, method, tmp_path, None, PUBMEDQA,
                                                            "method.num_virtual_tokens=4", *extra)
    if METHODS[method].trains:
        assert len(train_losses(run_dir)) == 2
        assert 0 < result["trainable_params"] <= result["total_params"]
        assert result["trainable_pct"] == pytest.approx(100 * result["trainable_params"] / result["total_params"])
        assert result["tokens_per_s"] > 0 and result["train_seconds"] > 0
        assert result["best_val_loss"] > 0 and result["last_train_loss"] > 0
        folder = run_dir / ("model" if method == "full" else "adapter")
        assert result["adapter_bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors")) > 0
        assert not (run_dir / ("adapter" if method == "full" else "model")).exists()
    else:
        assert result["trainable_params"] == 0 and result["adapter_bytes"] == 0
        assert not (run_dir / "train_log.jsonl").exists() or not train_losses(run_dir)
        assert result["best_val_loss"] > 0  # the val loss is measured even without training


@pytest.fixture(scope="module")
def sharp_causal(tiny_causal, tmp_path_factory):
    return sharpen(tiny_causal, tmp_path_factory.mktemp("sharp-llama"), "causal", 0.3, 0.3)


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _reload(run_dir, base, method):
    """The trained model as a plain transformers + peft user would load it, with no peftlab code involved."""
    from peft import PeftModel

    if method == "full":
        return _base(run_dir / "model")
    return PeftModel.from_pretrained(_base(base), run_dir / "adapter").eval()


@pytest.mark.parametrize("method", ["full", *ADAPTERS])
def test_saved_weights_reload_to_identical_scores(method, sharp_causal, tmp_path):
    cfg = tiny_cfg(sharp_causal, method, tmp_path, None, PUBMEDQA, "train.lr=5e-2" if method != "full" else
                   "train.lr=3e-3", "train.max_steps=4", "method.num_virtual_tokens=4")
    run_dir = run_training(cfg)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    saved = torch.tensor([[r["label_logprobs"][label] for label in ("yes", "no", "maybe")] for r in rows])

    task = get_task("pubmedqa")
    fmt = PromptFormat(load_tokenizer(sharp_causal), "causal", chat=True)
    items = encode_split(cfg.data, task, fmt, load_splits(cfg.data, task)["test"])
    model = _reload(run_dir, sharp_causal, method)
    reloaded = label_scores(model, fmt, items, task.labels, progress=False)
    assert torch.allclose(reloaded, saved, atol=1e-6), (reloaded - saved).abs().max()
    base = label_scores(_base(sharp_causal), fmt, items, task.labels, progress=False)
    assert not torch.allclose(base, saved, atol=1e-3)  # training changed the model, so the check has teeth


def test_same_seed_same_losses(tiny_causal, tmp_path):
    extra = ("train.max_steps=3", "train.batch_size=2", "method.dropout=0.1")
    a = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, "a", PUBMEDQA, *extra))
    b = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, "b", PUBMEDQA, *extra))
    c = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, "c", PUBMEDQA, *extra, "train.seed=1"))
    assert train_losses(a) == train_losses(b)
    assert train_losses(a) != train_losses(c)
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()


def test_each_epoch_has_its_own_order(tiny_causal, tmp_path, monkeypatch):
    seen: list[tuple[int | None, list[list[int]]]] = []

    def recording(items, max_tokens, max_rows, seed=None, **kw):
        batches = real(items, max_tokens, max_rows, seed, **kw)
        seen.append((seed, batches))
        return batches

    real = train_mod.token_batches
    monkeypatch.setattr(train_mod, "token_batches", recording)
    run_dir = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, None, PUBMEDQA, "train.max_steps=null",
                                    "train.epochs=2", "train.batch_size=2"))
    orders = [batches for seed, batches in seen if seed is not None]
    assert len(orders) == 2 and orders[0] != orders[1]
    assert [sorted(i for b in order for i in b) for order in orders] == [list(range(8))] * 2
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 8 and steps[-1]["epoch"] == 2.0
    assert [r["epoch"] for r in log if "val_loss" in r] == [1, 2]
    result = read_json(run_dir / "result.json")
    assert result["train_steps"] == 8
    assert result["best_val_loss"] == min(r["val_loss"] for r in log if "val_loss" in r)


def test_grad_accum_counts_optimizer_steps(tiny_causal, tmp_path):
    run_dir = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, None, PUBMEDQA, "train.max_steps=null",
                                    "train.batch_size=2", "train.grad_accum=2", "train.eval_every_epoch=false"))
    assert len(train_losses(run_dir)) == 2  # 8 examples / 2 per batch / 2 batches per step


def test_dialogsum_run(tiny_causal, small_dialogsum, tmp_path):
    run_dir = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, None, small_dialogsum, "data.task=dialogsum",
                                    "data.max_length=512"))
    metrics = read_json(run_dir / "metrics.json")
    assert {"test_rouge1", "test_rougeL", "val_rouge1"} <= set(metrics)
    assert read_json(run_dir / "result.json")["primary_metric"] == "rouge1"


def _pubmedqa_items(tiny_causal, n: int = 40):
    task = get_task("pubmedqa")
    fmt = PromptFormat(load_tokenizer(tiny_causal), "causal", True)
    examples = task.load(PUBMEDQA)[:n]
    return task, fmt, examples, [encode(task, ex, fmt, 512) for ex in examples]


def test_class_balance_weighs_every_class_alike(tiny_causal):
    task, fmt, examples, items = _pubmedqa_items(tiny_causal)
    weights = example_weights(task, fmt, items, 1.0)
    per_class = {label: sum(w for w, ex in zip(weights, examples, strict=True) if ex.target == label)
                 for label in task.labels}
    counts = {label: sum(ex.target == label for ex in examples) for label in task.labels}
    assert len(set(counts.values())) == 3  # the first 40 items are unbalanced, so the weights must differ
    for label in task.labels:  # each class present carries n / k of the total weight
        assert per_class[label] == pytest.approx(len(examples) / 3)
    half = example_weights(task, fmt, items, 0.5)
    rare = min(counts, key=counts.get)
    w = next(h for h, ex in zip(half, examples, strict=True) if ex.target == rare)
    assert w == pytest.approx((len(examples) / (3 * counts[rare])) ** 0.5)
    assert example_weights(task, fmt, items, 0.0) is None
    assert example_weights(get_task("dialogsum"), fmt, items, 1.0) is None


def test_class_balance_reads_an_explained_target_by_its_answer_word(tiny_causal):
    task, fmt, examples, items = _pubmedqa_items(tiny_causal)
    explain = get_task("pubmedqa-explain")
    explained = [encode(explain, ex, fmt, 512) for ex in examples]
    assert all(len(e.target_ids) > len(i.target_ids) for e, i in zip(explained, items, strict=True))
    assert example_weights(explain, fmt, explained, 1.0) == example_weights(task, fmt, items, 1.0)


@torch.no_grad()
def test_weighted_target_loss_is_the_weighted_sum(tiny_causal):
    from transformers import AutoModelForCausalLM

    _, fmt, _, items = _pubmedqa_items(tiny_causal, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    batch = collate(items, "causal", fmt.tokenizer.pad_token_id)
    per_row = [float(target_loss(model, "causal", collate([e], "causal", fmt.tokenizer.pad_token_id))[0])
               for e in items]
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    loss, n = target_loss(model, "causal", {**batch, "row_weights": weights})
    assert float(loss) == pytest.approx(sum(w * r for w, r in zip(weights.tolist(), per_row, strict=True)), rel=1e-4)
    tokens = [len(e.target_ids) for e in items]
    assert n == sum(tokens)
    assert weighted_targets({**batch, "row_weights": weights}) == pytest.approx(
        sum(w * t for w, t in zip(weights.tolist(), tokens, strict=True)))
    assert weighted_targets(batch) == sum(tokens)


def test_class_balance_changes_training(tiny_causal, tmp_path):
    plain = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, "plain", PUBMEDQA, "train.batch_size=8"))
    weighted = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, "weighted", PUBMEDQA, "train.batch_size=8",
                                     "train.class_balance=1.0"))
    assert train_losses(plain) != train_losses(weighted)
    assert load_config(weighted / "config.yaml").train.class_balance == 1.0


def test_bf16_weights_lose_adamw_steps_at_a_fine_tuning_lr():
    """The premise of `runtime.precision`: in bf16, most weights never take a small AdamW step."""
    torch.manual_seed(0)
    w = (torch.randn(576, 576) * 0.05).bfloat16().requires_grad_()
    before = w.detach().clone()
    optimizer = torch.optim.AdamW([w], lr=2e-5, weight_decay=0.0)
    for _ in range(10):
        (w.float().sum() * torch.randn(())).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = (w.detach() != before).float().mean().item()
    assert moved < 0.2, moved  # 9% here: only the smallest weights, whose ulp is under the step


def test_adapters_train_in_fp32_over_a_bf16_base(tiny_causal):
    """Why only full fine-tuning needs autocast on a GPU: peft keeps every adapter's weights in fp32."""
    from peftlab.models.loading import load_model

    for name in ("lora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning"):
        loaded = load_model(str(tiny_causal), device="cpu", dtype=torch.bfloat16)
        model = adapt(loaded, get_task("pubmedqa"), load_config(None, [f"method.name={name}"]).method)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}, name


def test_precision_keeps_fp32_weights_for_full_fine_tuning_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    full, lora = get_method("full"), get_method("lora")
    auto = load_config(None, [])
    bf16 = torch.bfloat16
    assert precision(auto, full, "cuda") == (torch.float32, bf16)  # bf16 weights would not take AdamW's steps
    assert precision(auto, lora, "cuda") == (None, None)  # bf16 base, fp32 adapters: as before
    assert precision(auto, full, "cpu") == (None, None)
    assert precision(load_config(None, ["model.dtype=bfloat16"]), full, "cuda") == (bf16, None)  # as told
    assert precision(load_config(None, ["train.mixed_precision=bf16"]), lora, "cpu") == (torch.float32, bf16)


def test_full_fine_tuning_under_bf16_autocast_moves_fp32_weights(tiny_causal, tmp_path):
    from safetensors.torch import load_file

    run = run_training(tiny_cfg(tiny_causal, "full", tmp_path, "mixed", PUBMEDQA, "train.mixed_precision=bf16",
                                "train.lr=1e-4"))
    base = load_file(tiny_causal / "model.safetensors")
    trained = load_file(next((run / "model").glob("*.safetensors")))
    assert {t.dtype for t in trained.values()} == {torch.float32}
    moved = [bool((trained[k] != base[k]).any()) for k in base if k in trained and base[k].dtype == torch.float32]
    assert sum(moved) > 0.8 * len(moved), f"only {sum(moved)} of {len(moved)} weight tensors changed"
    assert math.isfinite(train_losses(run)[-1])
    fp32 = run_training(tiny_cfg(tiny_causal, "full", tmp_path, "fp32", PUBMEDQA, "train.lr=1e-4"))
    assert train_losses(run)[0] != train_losses(fp32)[0]  # the forward really ran in bf16
    assert train_losses(run)[0] == pytest.approx(train_losses(fp32)[0], rel=2e-2)
