"""Evaluation: label scoring, the target loss against the model's own loss, and batched generation."""

from __future__ import annotations

import pytest
import torch
from builders import DIALOGSUM, PUBMEDQA

from peftlab.data.tasks import get_task
from peftlab.evaluate.generation import generate
from peftlab.evaluate.scoring import label_scores
from peftlab.evaluate.split_scoring import evaluate
from peftlab.models.forward import target_loss
from peftlab.models.loading import load_model
from peftlab.prompts.batches import batch_tokens, collate, right_padded_ok
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat


@pytest.fixture(scope="module")
def causal(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    return loaded, PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


@pytest.fixture(scope="module")
def seq2seq(tiny_seq2seq):
    loaded = load_model(str(tiny_seq2seq), device="cpu")
    return loaded, PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


def _pubmedqa(fmt, n=6, max_length=160):
    task = get_task("pubmedqa")
    examples = task.load(PUBMEDQA)[:n]
    return task, examples, [encode(task, ex, fmt, max_length) for ex in examples]


def _manual_logprob(model, prompt_ids: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) from one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(continuation))


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_label_scores_shape_and_predictions(which, request):
    loaded, fmt = request.getfixturevalue(which)
    task, examples, items = _pubmedqa(fmt)
    scores = label_scores(loaded.model, fmt, items, task.labels, progress=False)
    assert scores.shape == (len(items), 3)
    assert torch.isfinite(scores).all() and (scores <= 0).all()
    metrics, rows = evaluate(loaded.model, fmt, task, examples, items, progress=False)
    assert metrics["n"] == 6 and 0 <= metrics["accuracy"] <= 1 and "macro_f1" in metrics
    assert [r["prediction"] for r in rows] == [task.labels[int(i)] for i in scores.argmax(-1)]


def test_label_scores_match_unpadded_forward_passes(causal):
    """Left padding, position ids and logits_to_keep must not change a label's score; multi-token labels too."""
    loaded, fmt = causal
    _, _, items = _pubmedqa(fmt, n=4)
    labels = ("yes", "probably not")  # the second is several tokens: the per-label path
    assert len(fmt.label_ids("probably not")) > 1
    scores = label_scores(loaded.model, fmt, items, labels, progress=False)
    for i, e in enumerate(items):
        for j, label in enumerate(labels):
            want = _manual_logprob(loaded.model, e.prompt_ids, fmt.label_ids(label))
            assert scores[i, j].item() == pytest.approx(want, abs=1e-4)


def test_target_loss_matches_hf_loss_and_ignores_prompt(causal):
    loaded, fmt = causal
    _, _, items = _pubmedqa(fmt, n=3)
    batch = collate(items, "causal", fmt.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, n = target_loss(loaded.model, "causal", batch)
        assert n == sum(len(e.target_ids) for e in items)
        want = sum(-_manual_logprob(loaded.model, e.prompt_ids, e.target_ids) for e in items)
        assert float(loss) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("right", [False, True], ids=["left-masked", "right-unmasked"])
def test_target_loss_matches_unpadded_passes_in_both_layouts(causal, right):
    """Rows of different prompt and target lengths: each layout gives every row the loss it gets alone."""
    loaded, fmt = causal
    task = get_task("dialogsum")
    items = [encode(task, ex, fmt, 140 + 30 * i) for i, ex in enumerate(task.load(DIALOGSUM)[:3])]
    assert len({len(e.prompt_ids) for e in items}) == 3 and len({len(e.target_ids) for e in items}) > 1
    assert right_padded_ok(loaded.model, "causal", items)
    batch = collate(items, "causal", fmt.tokenizer.pad_token_id, right_padded=right)
    assert ("attention_mask" in batch) != right
    with torch.no_grad():
        loss, n = target_loss(loaded.model, "causal", batch)
    assert n == sum(len(e.target_ids) for e in items)
    assert batch_tokens(batch) == sum(e.length - 1 for e in items)
    want = sum(-_manual_logprob(loaded.model, e.prompt_ids, e.target_ids) for e in items)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_layouts_give_the_same_lora_gradients(tiny_causal):
    """The training layout is a speed choice only: LoRA gradients agree with the masked left-padded layout."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny_causal), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    task = get_task("dialogsum")
    items = [encode(task, ex, fmt, 130 + 25 * i) for i, ex in enumerate(task.load(DIALOGSUM)[:4])]
    grads = []
    for right in (False, True):
        model.zero_grad()
        batch = collate(items, "causal", fmt.tokenizer.pad_token_id, right_padded=right)
        loss, _ = target_loss(model, "causal", batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_prompt_learning_and_int_only_models_keep_the_masked_layout(causal):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    loaded, fmt = causal
    _, _, items = _pubmedqa(fmt, n=2)
    assert not right_padded_ok(loaded.model, "seq2seq", items)
    tuned = get_peft_model(load_model(str(loaded.path), device="cpu").model,
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    assert not right_padded_ok(tuned, "causal", items)

    class IntOnly(type(loaded.model)):  # slices with -logits_to_keep, as a few transformers models still do
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            return super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)

    loaded.model.__class__ = IntOnly
    try:
        assert not right_padded_ok(loaded.model, "causal", items)
    finally:
        loaded.model.__class__ = IntOnly.__mro__[1]


def test_batched_generation_equals_one_at_a_time(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    # A freshly initialised model repeats one token whatever the prompt; larger weights make outputs depend on it.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    task = get_task("dialogsum")
    examples = task.load(DIALOGSUM)[:6]
    items = [encode(task, ex, fmt, 96 + 40 * i) for i, ex in enumerate(examples)]  # different prompt lengths
    assert len({len(e.prompt_ids) for e in items}) > 1
    batched = generate(loaded.model, fmt, items, max_new_tokens=12, max_rows=6, progress=False)
    single = [generate(loaded.model, fmt, [e], max_new_tokens=12, progress=False)[0] for e in items]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)


def test_seq2seq_generation_and_metrics(seq2seq):
    loaded, fmt = seq2seq
    task = get_task("dialogsum")
    examples = task.load(DIALOGSUM)[:3]
    items = [encode(task, ex, fmt, 128) for ex in examples]
    metrics, rows = evaluate(loaded.model, fmt, task, examples, items, progress=False)
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(metrics)
    assert metrics["truncated_examples"] == sum(e.truncated > 0 for e in items) > 0
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) for r in rows)


def test_calibrate_divides_out_the_content_free_lean():
    from peftlab.evaluate.scoring import calibrate

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.35, 0.2], [0.6, 0.1, 0.3]])
    lean = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])  # mean (0.5, 0.3, 0.2)
    got = calibrate(probs.log(), lean.log()).exp()
    want = probs / torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(got, want / want.sum(-1, keepdim=True))
    assert got.argmax(-1).tolist() == [0, 1, 2]  # uncalibrated, every row says label 0
    uniform = torch.full((1, 3), 1 / 3).log()
    torch.testing.assert_close(calibrate(probs.log(), uniform), probs.log())  # no lean, no change


def test_calibrated_evaluation_uses_content_free_prompts_with_the_same_demos(causal, tmp_path):
    from peftlab.core.config import load_config
    from peftlab.evaluate.scoring import calibrate
    from peftlab.prompts.encoding import content_free_items, encode_split, few_shot_demos

    loaded, fmt = causal
    task = get_task("pubmedqa")
    examples = task.load(PUBMEDQA)[:8]
    cfg = load_config(None, base={"data": {"max_length": 1024, "calibrate": True}})
    demos = few_shot_demos(task, examples[:4], 1, seed=0)
    items = encode_split(cfg.data, task, fmt, examples[4:], demos)
    free = content_free_items(cfg.data, task, fmt, examples[:4], demos)
    assert len(free) == 3 and all(demos[0][0][:40] in fmt.tokenizer.decode(e.prompt_ids) for e in free)
    assert "N/A" in fmt.tokenizer.decode(free[0].prompt_ids)
    metrics, rows = evaluate(loaded.model, fmt, task, examples[4:], items, progress=False, content_free=free)
    want = calibrate(label_scores(loaded.model, fmt, items, task.labels, progress=False),
                     label_scores(loaded.model, fmt, free, task.labels, progress=False))
    assert [r["prediction"] for r in rows] == [task.labels[int(i)] for i in want.argmax(-1)]
    raw = [max(r["label_logprobs"], key=r["label_logprobs"].get) for r in rows]  # the uncalibrated scores are kept
    gold = [e.references[0] for e in examples[4:]]
    assert metrics["uncalibrated_accuracy"] == sum(p == g for p, g in zip(raw, gold, strict=True)) / 4
    assert not content_free_items(load_config(None, base={}).data, task, fmt, examples[:4], demos)  # off by default
