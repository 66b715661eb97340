"""Catastrophic forgetting: what training on one task costs on others and on plain text.

After training, the model and its base (the same weights with the adapter switched off, or a fresh copy of the base
for full fine-tuning) are scored on the test splits of other tasks and on the next-token loss of a small held
general-text set. Deltas are `trained - base`: a negative accuracy delta or a positive loss delta is forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peftlab.core.config import DataConfig, RunConfig, from_dict
from peftlab.core.errors import PeftlabError
from peftlab.data.mixture import metric_key
from peftlab.data.splits import load_splits
from peftlab.data.tasks import Example, Task, get_task
from peftlab.evaluate.scoring import mean_loss
from peftlab.evaluate.split_scoring import evaluate
from peftlab.methods.registry import Method
from peftlab.models.device import parse_dtype
from peftlab.models.loading import load_model
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import Encoded, PromptFormat

GENERAL_TEXT = "data/general/general_text.txt"
MAX_PARAGRAPH_TOKENS = 256


@dataclass
class Suite:
    """What forgetting is measured on, encoded once and scored twice (base and trained)."""

    tasks: list[tuple[str, Task, list[Example], list[Encoded]]] = field(default_factory=list)
    general: list[Encoded] = field(default_factory=list)


def general_items(fmt: PromptFormat, path: Path) -> list[Encoded]:
    """Paragraphs of a plain-text file (blank-line separated) as next-token-loss items.

    Decoder models predict every token after the first; seq2seq models predict a paragraph's second half from its
    first, the closest they come to plain language modelling.
    """
    if not path.is_file():
        raise PeftlabError(f"{path}: no such general-text file (set experiments.general_text)")
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tok = fmt.tokenizer
    items = []
    for i, text in enumerate(paragraphs):
        if fmt.kind == "seq2seq":
            words = text.split()
            half = max(len(words) // 2, 1)
            prompt = tok(" ".join(words[:half])).input_ids[:MAX_PARAGRAPH_TOKENS]
            target = tok(text_target=" ".join(words[half:]) or ".").input_ids[:MAX_PARAGRAPH_TOKENS]
        else:
            ids = tok(text).input_ids[:MAX_PARAGRAPH_TOKENS]
            prompt, target = ids[:1], ids[1:]
        if len(target) >= 2:
            items.append(Encoded(f"general-{i}", prompt, target))
    return items


def build_suite(cfg: RunConfig, fmt: PromptFormat) -> Suite:
    """Encode the other tasks' test splits (first `forgetting_limit` items) and the general text."""

    ex = cfg.experiments
    suite = Suite()
    for name in ex.forgetting:
        task = get_task(name)
        other = from_dict(DataConfig, {"task": name, "path": ex.forgetting_data.get(name), "seed": cfg.data.seed},
                          f"experiments.forgetting_data.{name}")
        examples = load_splits(other, task)["test"][: ex.forgetting_limit]
        items = [encode(task, e, fmt, cfg.data.max_length) for e in examples]
        suite.tasks.append((name, task, examples, items))
    general = ex.general_text or (GENERAL_TEXT if ex.forgetting else None)
    if general:
        suite.general = general_items(fmt, Path(general))
    return suite


def measure(model, fmt: PromptFormat, suite: Suite) -> dict[str, float]:
    """Each forgetting task's primary metric and the general-text loss of one model."""
    out = {}
    for name, task, examples, items in suite.tasks:
        metrics, _ = evaluate(model, fmt, task, examples, items, split="forgetting", progress=False)
        out[f"forget_{metric_key(name)}_{task.primary_metric}"] = metrics[task.primary_metric]
    if suite.general:
        out["forget_general_loss"] = mean_loss(model, fmt.kind, suite.general, fmt.tokenizer.pad_token_id)
    return out


def measure_base(cfg: RunConfig, method: Method, model, fmt: PromptFormat, suite: Suite, trained: dict
                 ) -> dict[str, float]:
    """The same measures on the untrained base: adapter off for peft models, a fresh base for full fine-tuning."""
    if not method.trains:
        return dict(trained)  # zero- and few-shot runs are the base model (the probes use no shots)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return measure(model, fmt, suite)

    device = str(next(model.parameters()).device)
    base = load_model(cfg.model.name, device=device, dtype=parse_dtype(cfg.model.dtype), chat=cfg.model.chat,
                      allow_pickle=cfg.model.allow_pickle)
    return measure(base.model, fmt, suite)


def forgetting_metrics(cfg: RunConfig, method: Method, model, fmt: PromptFormat) -> dict[str, float]:
    """Raw trained values, `_base` values and `_delta` (trained - base) for every forgetting measure of `model`,
    trained by `method`."""
    suite = build_suite(cfg, fmt)
    if not suite.tasks and not suite.general:
        return {}
    trained = measure(model, fmt, suite)
    base = measure_base(cfg, method, model, fmt, suite, trained)
    out: dict[str, float] = {}
    for key, value in trained.items():
        out[key] = value
        out[f"{key}_base"] = base[key]
        out[f"{key}_delta"] = value - base[key]
    return out
