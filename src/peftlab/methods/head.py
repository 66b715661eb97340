"""`linear-head`: a class-balanced logistic-regression head on the frozen model's hidden states.

The cheapest adaptation there is: one forward pass per training example, no backward, and a convex fit. It is the
method the cross-validated PubMedQA protocol can afford on a 2-core CPU (10 folds share one feature pass), and a
strong check on the gradient methods: a LoRA run that cannot beat a linear read-out of the frozen model has learned
the label prior, not the task.

The features are the prompt's hidden states at one layer, mean-pooled over its tokens. Middle layers carry more
task signal than the last one, which is shaped for next-token prediction. With `method.head_text`, feature sets that
read the example's words (`peftlab.methods.text_features`) each get a regression of their own, and their class
log-probabilities are added to the hidden-state head's. The head answers `evaluate`'s label scoring directly, so the
results table, the brittleness probe and the report treat it like any other method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from peftlab.core.config import MethodConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import Example, Task
from peftlab.methods.frozen_pass import decoder_layers, pooled_field, pooled_states, prompt_pass, stored_rows
from peftlab.methods.text_features import TextHead, example_text, feature_set
from peftlab.models.hf_folder import LoadedModel
from peftlab.prompts.batches import forward_tokens
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.weights import class_weights

HEAD_FILE = "head.safetensors"
HEAD_META = "head.json"
TEXT_HEADS = "text_heads.json"


class LinearHead(torch.nn.Module):
    """A frozen causal LM plus a linear classifier on one layer's mean-pooled hidden states."""

    def __init__(self, base: torch.nn.Module, layer: int, labels: Sequence[str], hidden_size: int, source: str):
        super().__init__()
        self.base = base
        self.layer = layer
        self.labels = tuple(labels)
        self.source = source  # the base model's name: part of the feature-cache key
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.linear = torch.nn.Linear(hidden_size, len(labels))
        self.text_heads: list[TextHead] = []  # fitted by fit_head when method.head_text names feature sets

    @torch.inference_mode()
    def features(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Mean-pooled hidden states after decoder layer `layer` (1-based), running only the layers up to it.

        For a batch of prompts already encoded, `extract` reads the same states from the shared frozen pass.
        """
        layers = decoder_layers(self.base)
        check_layer(self.base, self.layer)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if position_ids is None:
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return pooled_states(self.base, layers[: self.layer], batch)

    def class_logprobs(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear((pooled - self.mean) / self.scale).log_softmax(-1)

    def forward(self, input_ids, attention_mask, position_ids=None, **_) -> torch.Tensor:
        """Class log-probabilities, shape (batch, labels)."""
        return self.class_logprobs(self.features(input_ids, attention_mask, position_ids))

    def label_logprobs(self, items: Sequence[Encoded], pad_id: int, progress: bool = True,
                       examples: Sequence[Example] | None = None, frozen: bool = False) -> torch.Tensor:
        """What `evaluate.scoring.label_scores` asks of any model: per-item label log-likelihoods, from cached
        features.

        The text heads, if any, add their log-probabilities; they read `examples`, the items' source examples.
        """
        with torch.inference_mode():
            states = extract(self, items, pad_id, progress, frozen)
            scores = self.class_logprobs(states.to(self.mean.device)).cpu()
        if self.text_heads:
            if examples is None or len(examples) != len(items):
                raise PeftlabError("linear-head with text features scores examples, not bare prompts: pass examples")
            texts = [example_text(ex) for ex in examples]
            scores = scores + sum(h.logprobs(texts) for h in self.text_heads)
        return scores


def build(loaded: LoadedModel, task: Task, cfg: MethodConfig) -> LinearHead:
    """Freeze the base and attach an untrained head; the task must be classification."""
    if task.kind != "classification" or not task.labels:
        raise PeftlabError(f"linear-head needs a classification task; {task.name} is {task.kind}")
    if loaded.kind != "causal":
        raise PeftlabError(f"linear-head supports decoder-only models; {loaded.name} is {loaded.kind}")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    for name in cfg.head_text:
        feature_set(name)  # an unknown name fails here, before the feature pass
    head = LinearHead(loaded.model, cfg.head_layer, task.labels, loaded.model.config.hidden_size, loaded.name)
    return head.to(next(loaded.model.parameters()).device)


def check_layer(base: torch.nn.Module, layer: int) -> None:
    """The head's layer must be one of the base's decoder layers (Llama-style `model.layers`)."""
    layers = decoder_layers(base)
    if layers is None:
        raise PeftlabError("linear-head needs a decoder-only model with model.layers (Llama-style)")
    if not 1 <= layer <= len(layers):
        raise PeftlabError(f"method.head_layer must be in 1..{len(layers)}, got {layer}")


def extract(head: LinearHead, items: Sequence[Encoded], pad_id: int, progress: bool = True, frozen: bool = True
            ) -> torch.Tensor:
    """Pooled features of each item's prompt: through the shared frozen-base store (`methods.frozen_pass`), or
    with `frozen=False` (a server's requests) computed and kept nowhere."""
    check_layer(head.base, head.layer)
    compute = partial(prompt_pass, head.base, pad_id=pad_id, max_tokens=forward_tokens(head.mean.device),
                      last_layer=head.layer, progress=progress)
    if not frozen:
        return compute(list(items))[pooled_field(head.layer)]
    return stored_rows(head.base, items, pooled_field(head.layer), compute)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float, balance: float
) -> dict[str, torch.Tensor]:
    """Standardise `x` and fit an L2 logistic regression (scikit-learn, lbfgs); returns the head's tensors.

    A class absent from `y` gets a -1e4 bias, so it is never predicted.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise PeftlabError(f"linear-head needs at least two classes in the train split; found {present}")
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
    clf = LogisticRegression(C=c, class_weight=class_weights(y, n_classes, balance), max_iter=5000)
    # One BLAS thread: a fit this small spends more time syncing threads than computing, and on a 2-core machine
    # two threads per fit measured 20x slower (1.0 s against 0.05 s) whenever anything else was running.
    with threadpool_limits(1):
        clf.fit(((x - mean) / scale).numpy(), y.numpy())
    coef, intercept = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if len(present) == 2:  # scikit-learn's binary model is one logit for the second class; split it symmetrically
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    weight, bias = torch.zeros(n_classes, x.shape[1]), torch.full((n_classes,), -1e4)
    weight[present], bias[present] = coef, intercept
    return {"mean": mean, "scale": scale, "linear.weight": weight, "linear.bias": bias}


def fit_head(cfg: MethodConfig, head: LinearHead, task: Task, fmt: PromptFormat, train: Sequence[Encoded],
             train_examples) -> dict:
    """The method's whole training: one feature pass over the train split, then a convex fit."""
    started = time.perf_counter()
    x = extract(head, train, fmt.tokenizer.pad_token_id)
    y = torch.tensor([task.labels.index(ex.target) for ex in train_examples])
    fitted = fit_logistic(x, y, len(task.labels), cfg.head_c, cfg.class_balance)
    head.load_state_dict(fitted, strict=False)
    texts = [example_text(ex) for ex in train_examples]
    head.text_heads = [TextHead(feature_set(name), len(task.labels)).fit(texts, y, cfg.class_balance)
                       for name in cfg.head_text]
    seconds = time.perf_counter() - started
    tokens = sum(len(e.prompt_ids) for e in train)
    return {"train_steps": 0, "train_seconds": seconds, "tokens_per_s": tokens / seconds, "last_train_loss": None,
            "best_val_loss": None, "lr": None}


def save_head(head: LinearHead, model_name: str, run_dir: Path) -> int:
    """Write the head (safetensors), its text heads (JSON) and what it was fitted on; returns bytes on disk."""
    from safetensors.torch import save_file

    out = run_dir / "head"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in head.state_dict().items() if not k.startswith("base.")}
    save_file(state, str(out / HEAD_FILE))
    meta = {"method": "linear-head", "base_model": model_name, "layer": head.layer, "labels": list(head.labels),
            "text_heads": [h.features.name for h in head.text_heads]}
    (out / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n")
    files = [out / HEAD_FILE]
    if head.text_heads:
        files.append(out / TEXT_HEADS)
        files[-1].write_text(json.dumps([h.state() for h in head.text_heads]))
    return sum(f.stat().st_size for f in files)


def load_head(loaded: LoadedModel, task: Task, cfg: MethodConfig, run_dir: Path) -> LinearHead:
    """A saved head on the frozen base: its standardisation and linear layer, and its text heads if it had any."""
    from safetensors.torch import load_file

    folder = run_dir / "head"
    meta = json.loads((folder / HEAD_META).read_text())
    if tuple(meta["labels"]) != tuple(task.labels):
        raise PeftlabError(f"{folder}: fitted on labels {meta['labels']}, but the task has {list(task.labels)}")
    head = build(loaded, task, cfg)
    head.layer = meta["layer"]
    head.load_state_dict(load_file(str(folder / HEAD_FILE)), strict=False)
    if meta["text_heads"]:
        states = json.loads((folder / TEXT_HEADS).read_text())
        head.text_heads = [TextHead.from_state(state, len(task.labels)) for state in states]
    return head
