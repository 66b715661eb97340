"""The linear head: early-exit features, the logistic fit's mapping into torch, and a full run through the harness."""

from __future__ import annotations

import json

import pytest
import torch
from builders import PUBMEDQA
from trainkit import tiny_cfg

from peftlab.core.config import MethodConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import get_task
from peftlab.methods.head import build, fit_logistic
from peftlab.models.loading import load_model
from peftlab.prompts.weights import class_weights
from peftlab.recipes.train_run import run_training


def test_class_weights_interpolate_between_none_and_balanced():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert class_weights(y, 3, 0.0) == {0: 1.0, 1: 1.0, 2: 1.0}
    balanced = class_weights(y, 3, 1.0)
    assert balanced[2] == pytest.approx(10 / 3) and balanced[0] == pytest.approx(10 / 18)
    # Balanced weights make every class carry the same total weight.
    assert 6 * balanced[0] == pytest.approx(1 * balanced[2])
    assert class_weights(y, 3, 0.5)[2] == pytest.approx((10 / 3) ** 0.5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fit_logistic_reproduces_sklearn_probabilities(n_classes):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g) * 3 + 1
    y = torch.randint(0, n_classes, (60,), generator=g)
    head = fit_logistic(x, y, n_classes, c=1.0, balance=0.0)
    z = (x - head["mean"]) / head["scale"]
    ours = (z @ head["linear.weight"].T + head["linear.bias"]).softmax(-1)
    ref = LogisticRegression(C=1.0, max_iter=5000).fit(z.numpy(), y.numpy()).predict_proba(z.numpy())
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-4)


def test_fit_logistic_never_predicts_an_absent_class():
    x = torch.randn(20, 4)
    y = torch.tensor([0, 2] * 10)
    head = fit_logistic(x, y, 3, c=1.0, balance=1.0)
    logits = (x - head["mean"]) / head["scale"] @ head["linear.weight"].T + head["linear.bias"]
    assert (logits.argmax(-1) != 1).all()
    with pytest.raises(PeftlabError, match="two classes"):
        fit_logistic(x, torch.zeros(20, dtype=torch.long), 3, 1.0, 1.0)


def test_features_stop_at_the_probed_layer_and_match_a_full_forward(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    head = build(loaded, get_task("pubmedqa"), MethodConfig(name="linear-head", head_layer=1))
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pooled = head.features(ids, mask, pos)
    with torch.inference_mode():
        hidden = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    expected = torch.stack([hidden.hidden_states[1][0].mean(0), hidden.hidden_states[1][1, 2:].mean(0)])
    assert torch.allclose(pooled, expected, atol=1e-5)
    # The layer above the probed one never ran: a hook on it would have fired.
    fired = []
    handle = loaded.model.model.layers[1].register_forward_hook(lambda *a: fired.append(1))
    head.features(ids, mask, pos)
    handle.remove()
    assert not fired


def test_linear_head_refuses_generation_tasks_and_seq2seq_models(tiny_causal, tiny_seq2seq):
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(PeftlabError, match="classification"):
        build(loaded, get_task("dialogsum"), MethodConfig(name="linear-head"))
    with pytest.raises(PeftlabError, match="decoder-only"):
        build(load_model(str(tiny_seq2seq), device="cpu"), get_task("pubmedqa"), MethodConfig(name="linear-head"))


def test_linear_head_run_fits_saves_and_beats_chance_on_its_train_split(tiny_causal, tmp_path):
    from safetensors.torch import load_file

    from peftlab.data.splits import load_splits
    from peftlab.evaluate.split_scoring import evaluate
    from peftlab.prompts.encoding import encode_split
    from peftlab.prompts.format import PromptFormat

    cfg = tiny_cfg(tiny_causal, "linear-head", tmp_path, "head", PUBMEDQA, "data.limit_train=60", "data.limit_eval=20",
                   "method.head_layer=2", "method.head_c=100", "method.class_balance=0", "data.max_length=256")
    run_dir = run_training(cfg)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == "linear-head"
    assert result["trainable_params"] == 3 * 32 + 3  # the head only: weight and bias over 32 hidden units
    assert (run_dir / "head" / "head.safetensors").stat().st_size == result["adapter_bytes"] > 0
    assert json.loads((run_dir / "head" / "head.json").read_text())["labels"] == ["yes", "no", "maybe"]
    assert {"test_accuracy", "test_macro_f1"} <= set(result["metrics"])
    # Reload the saved head and score its own training split: a nearly unregularised head on 60 examples in 32
    # dimensions must fit them far better than the majority class does.
    task = get_task("pubmedqa")
    train = load_splits(cfg.data, task)["train"]
    loaded = load_model(str(tiny_causal), device="cpu")
    head = build(loaded, task, cfg.method)
    head.load_state_dict(load_file(str(run_dir / "head" / "head.safetensors")), strict=False)
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    metrics, _ = evaluate(head, fmt, task, train, encode_split(cfg.data, task, fmt, train), progress=False)
    majority = max(sum(ex.target == label for ex in train) for label in task.labels) / len(train)
    assert metrics["accuracy"] > majority + 0.1


def test_text_heads_add_their_logprobs_to_the_hidden_state_head(tiny_causal, tmp_path):
    from peftlab.data.splits import load_splits
    from peftlab.evaluate.scoring import label_scores
    from peftlab.methods.head import fit_head
    from peftlab.methods.text_features import example_text
    from peftlab.prompts.encoding import encode_split
    from peftlab.prompts.format import PromptFormat

    cfg = tiny_cfg(tiny_causal, "linear-head", tmp_path, "text", PUBMEDQA, "data.limit_train=40", "data.limit_eval=10",
                   "method.head_layer=1", "method.head_text=[reported-statistics,word-pairs]", "data.max_length=256")
    run_dir = run_training(cfg)
    result = json.loads((run_dir / "result.json").read_text())
    saved = json.loads((run_dir / "head" / "text_heads.json").read_text())
    assert [h["name"] for h in saved] == ["reported-statistics", "word-pairs"]
    # The text heads' coefficients count as trainable parameters beside the hidden head's 3 x 32 + 3.
    text_params = sum(len(h["coef"]) * len(h["coef"][0]) + len(h["intercept"]) for h in saved)
    assert result["trainable_params"] == 3 * 32 + 3 + text_params > 3 * 32 + 3 + 3 * 7
    files = ("head.safetensors", "text_heads.json")
    assert result["adapter_bytes"] == sum((run_dir / "head" / f).stat().st_size for f in files)

    task, loaded = get_task("pubmedqa"), load_model(str(tiny_causal), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    splits = load_splits(cfg.data, task)
    head = build(loaded, task, cfg.method)
    fit_head(cfg.method, head, task, fmt, encode_split(cfg.data, task, fmt, splits["train"]), splits["train"])
    test = splits["test"]
    items = encode_split(cfg.data, task, fmt, test)
    fused = label_scores(head, fmt, items, task.labels, progress=False, examples=test)
    texts = [example_text(ex) for ex in test]
    hidden_only = fused - sum(h.logprobs(texts) for h in head.text_heads)
    text_heads, head.text_heads = head.text_heads, []
    assert torch.allclose(hidden_only, label_scores(head, fmt, items, task.labels, progress=False), atol=1e-5)
    head.text_heads = text_heads
    with pytest.raises(PeftlabError, match="pass examples"):
        label_scores(head, fmt, items, task.labels, progress=False)


def test_an_unknown_text_feature_set_fails_before_the_feature_pass(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(PeftlabError, match="unknown text feature set"):
        build(loaded, get_task("pubmedqa"), MethodConfig(name="linear-head", head_text=["bigrams"]))
