"""Brittleness probe: flip rates are 0 for a whitespace-blind model and > 0 for a sensitive one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from builders import PUBMEDQA
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.core.config import load_config
from peftlab.data.tasks import Example, get_task
from peftlab.evaluate.split_scoring import evaluate
from peftlab.experiments.brittleness import probe_model, reorder_context
from peftlab.models.loading import load_model
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat
from peftlab.recipes.train_run import run_training

WHITESPACE_ONLY = ("trailing_space", "whitespace")


class WhitespaceBlind(torch.nn.Module):
    """Logits from a summed bag of the prompt's non-whitespace tokens: blind to whitespace by construction.

    A sum (not a mean) lets each item's content, not the shared template, decide between the labels.
    """

    def __init__(self, tokenizer):
        super().__init__()
        vocab = len(tokenizer)
        keep = torch.ones(vocab)
        for i in range(vocab):
            text = tokenizer.decode([i])
            if text and not text.strip():
                keep[i] = 0.0
        self.register_buffer("keep", keep)
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab, bias=False)

    def forward(self, input_ids, attention_mask, logits_to_keep=1, **_):
        weight = attention_mask.float() * self.keep[input_ids]
        pooled = (self.embed(input_ids) * weight[..., None]).sum(1)
        logits = self.head(pooled)[:, None, :].expand(-1, max(logits_to_keep, 1), -1)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def pubmedqa_examples():
    return get_task("pubmedqa").load(PUBMEDQA)[:24]


def _fmt(loaded):
    return PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


def test_whitespace_blind_model_never_flips(tiny_causal, pubmedqa_examples):
    loaded = load_model(str(tiny_causal), device="cpu")
    task, fmt, model = get_task("pubmedqa"), _fmt(loaded), WhitespaceBlind(loaded.tokenizer)
    # A long max_length: a longer prompt may otherwise cut the context at another token, a real (content) change.
    report = probe_model(model, fmt, task, pubmedqa_examples, max_length=4096, perturbations=WHITESPACE_ONLY)
    for name in WHITESPACE_ONLY:
        assert report["perturbations"][name]["n_applicable"] == len(pubmedqa_examples)
        assert report["perturbations"][name]["flip_rate"] == 0.0
    assert report["flip_rate"] == 0.0 and report["metric_spread"] == 0.0
    # the model is not constant: its predictions differ between items, so zero flips is a property, not a given
    items = [encode(task, ex, fmt, 4096) for ex in pubmedqa_examples]
    _, rows = evaluate(model, fmt, task, pubmedqa_examples, items, progress=False)
    assert len({r["prediction"] for r in rows}) > 1


def test_sensitive_random_llama_flips(tiny_causal, pubmedqa_examples):
    loaded = load_model(str(tiny_causal), device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: the tiny Llama's label scores react to any token change
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen))
    report = probe_model(loaded.model, _fmt(loaded), get_task("pubmedqa"), pubmedqa_examples,
                         perturbations=WHITESPACE_ONLY)
    assert report["flip_rate"] > 0
    rates = [report["perturbations"][n]["flip_rate"] for n in WHITESPACE_ONLY]
    assert report["flip_rate"] == pytest.approx(sum(rates) / 2)  # both apply to every item
    values = [report["unperturbed"]] + [report["perturbations"][n]["accuracy"] for n in WHITESPACE_ONLY]
    assert report["metric_spread"] == pytest.approx(max(values) - min(values))


def test_reorder_context():
    pubmed = Example("p1", {"context": "A one. B two. C three.", "question": "q"}, "yes", ("yes",),
                     extra={"contexts": ["A one.", "B two.", "C three."]})
    moved = reorder_context(pubmed, "context")
    assert moved.inputs["context"] != pubmed.inputs["context"]
    paragraphs = [p + "." for p in moved.inputs["context"].rstrip(".").split(". ")]
    assert sorted(paragraphs) == sorted(pubmed.extra["contexts"])  # the same paragraphs, another order
    assert reorder_context(pubmed, "context").inputs == moved.inputs  # seeded: the same order every time
    single = Example("p2", {"context": "Only one sentence here", "question": "q"}, "no", ("no",))
    assert reorder_context(single, "context") is None
    dialogue = Example("d1", {"dialogue": "#Person1#: Hi. How are you?\n#Person2#: Fine."}, "s", ("s",))
    turns = reorder_context(dialogue, "dialogue").inputs["dialogue"].split("\n")
    assert turns == ["#Person2#: Fine.", "#Person1#: Hi. How are you?"]  # whole turns move, not sentences


def test_probe_in_a_run_and_from_the_cli(tiny_causal, small_pubmedqa, tmp_path):
    cfg = load_config(None, [
        f"model.name={tiny_causal}", "method.name=lora", f"data.path={small_pubmedqa}", "data.limit_train=8",
        "data.limit_eval=6", "train.max_steps=1", f"output_dir={tmp_path}", "name=r", "experiments.probe=true",
        "experiments.probe_limit=3",
    ])
    run_dir = run_training(cfg)
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    for key in ("flip_rate", "flip_rate_trailing_space", "flip_rate_whitespace", "flip_rate_template",
                "flip_rate_reorder_context", "metric_spread"):
        assert 0.0 <= metrics[key] <= 1.0
    assert json.loads((run_dir / "probe.json").read_text())["n"] == 3  # experiments.probe_limit
    (run_dir / "probe.json").unlink()
    result = CliRunner().invoke(app, ["probe", str(run_dir), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "probe.json").read_text())["n"] == 2
    assert "flip_rate" in json.loads((run_dir / "result.json").read_text())["metrics"]
