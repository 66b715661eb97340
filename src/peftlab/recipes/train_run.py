"""The training recipe: one run, from its config to a finished run folder, read top to bottom.

    config -> task data and splits -> base model -> method -> encode -> train (`peftlab.train.loop.fit`) or fit the
    linear head -> test evaluation -> experiments -> run folder (result.json last)

A multi-task mixture takes the same path as a single task. Only two things differ, and both live in the data: how
the training examples are drawn (`prompts.encoding.sample_train`) and that val and test are scored per task, with
metric keys that name it (`data.mixture.Part.metric`). A single-task run is a mixture of one part.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peftlab.core.config import RunConfig, save_config
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable, write_json, write_jsonl
from peftlab.core.lock import run_folder_lock
from peftlab.core.resources import peak_rss_mb, versions
from peftlab.core.result import RunResult, write_result
from peftlab.core.signals import stop_on_signals
from peftlab.data.mixture import Part, is_mixture, load_parts, parse_mixture, single_part
from peftlab.data.splits import data_labels, load_splits
from peftlab.data.targets import resolve_targets
from peftlab.data.tasks import DEFAULT_DATA, Example, task_for
from peftlab.evaluate.scoring import mean_loss, probe_batches
from peftlab.evaluate.split_scoring import evaluate
from peftlab.experiments.after_training import run_experiments
from peftlab.kernels.memory import enable_checkpointing, fused_rmsnorm, lean_swiglu
from peftlab.methods.frozen_pass import STATS, STORE_FILE, reset_stats
from peftlab.methods.head import fit_head
from peftlab.methods.registry import Method, apply_method, count_params, get_method, plain_path_reason, use_plain_path
from peftlab.models.hf_folder import LoadedModel, check_max_length
from peftlab.models.loading import load_model
from peftlab.prompts.encoding import (
    content_free_items,
    encode_split,
    encode_train,
    few_shot_demos,
    format_for,
    sample_train,
)
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.train.checkpoint import CHECKPOINT
from peftlab.train.loop import FitData, fit
from peftlab.train.measured_precision import (
    SCORING_ROWS,
    PrecisionChoice,
    cached,
    choose,
    measure_scoring,
    pinned,
    scoring_probe_items,
)
from peftlab.train.runtime import accelerator_and_dtype, seed_everything
from peftlab.train.save import save_trained


@dataclass
class RunContext:
    """Everything the recipe's stages share for one run: the config, the data, the model and where it runs."""

    cfg: RunConfig
    method: Method
    parts: list[Part]
    loaded: LoadedModel
    fmt: PromptFormat
    accelerator: object
    started: float
    train: list[Encoded] = field(default_factory=list)
    train_examples: list[Example] = field(default_factory=list)  # behind `train`, for a single task
    train_mix: dict[str, int] = field(default_factory=dict)  # training examples drawn per task
    dropped: int = 0  # training rows left out: over data.max_length even cut (data.too_long: cut)
    # (part key, split) -> encoded items; split is "val", "test" or "content_free" (calibration prompts)
    enc: dict[tuple[str, str], list[Encoded]] = field(default_factory=dict)
    score_val: bool = True  # score val after training (a decision study's final runs skip it: val chose them)
    scoring: PrecisionChoice | None = None  # what test scoring computes in (`scoring_precision`)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def run_training(cfg: RunConfig, on_epoch_end=None, score_test: bool = True, score_val: bool = True) -> Path:
    """Train (or, for zero/few-shot, only evaluate) one method and write its run folder.

    `score_test=False`: a tuning trial, judged on val alone; the test split is neither scored nor looked at, so
    choosing a config cannot select on it. `score_val=False`: a decision study's final run, whose config was
    already chosen on val; val is not scored again after training (it still serves early stopping). A SIGTERM or
    Ctrl-C stops it with one line (`core.signals.Stopped`), after the current training step and a checkpoint of
    it: `--resume` goes on from there.
    """
    with stop_on_signals():
        return _train_run(cfg, on_epoch_end, score_test, score_val)


def _train_run(cfg: RunConfig, on_epoch_end, score_test: bool, score_val: bool) -> Path:
    ensure_writable(cfg.run_dir, "set output_dir to a writable folder")  # before the model loads, not after training
    frozen = reset_stats()  # counts this run's prompts through the shared frozen-base pass
    ctx = prepare(cfg, select=not score_test)
    ctx.score_val = score_val
    if not score_test:
        ctx.enc.update({key: [] for key in ctx.enc if key[1] == "test"})
    main = ctx.accelerator.is_main_process
    # One process per run folder: a second `peftlab train` on it stops here rather than mixing two runs' files.
    with run_folder_lock(ctx.run_dir) if main else contextlib.nullcontext():
        if main:
            save_config(cfg, ctx.run_dir / "config.yaml")
            if cfg.train.report_to:
                ctx.accelerator.init_trackers(cfg.name)
        enable_checkpointing(ctx.loaded.model, cfg.train.activation_checkpointing)
        # A tuner not checked against the speed paths runs without them.
        plain = plain_path_reason(ctx.method, cfg.method)
        if plain is None:
            lean_swiglu(ctx.loaded.model)  # the gated MLPs keep two tensors for backward, not three: same gradients
            fused_rmsnorm(ctx.loaded.model)  # one fused kernel per norm instead of five ops: same outputs
        else:
            use_plain_path(ctx.loaded.model, plain, cfg.train)
        model = apply_method(ctx.method, ctx.loaded, ctx.parts[0].task, cfg.method)
        trainable, total = count_params(model)
        summary = train_model(ctx, model, on_epoch_end)
        if ctx.method.build is not None:  # the linear head's text heads are fitted outside torch: not counted above
            trainable += sum(h.n_params for h in model.text_heads)
        ctx.accelerator.wait_for_everyone()
        if main:
            finish(ctx, ctx.accelerator.unwrap_model(model), summary, (trainable, total))
            if frozen.prompts:
                print(f"frozen base: {frozen.from_store} of {frozen.prompts} prompt passes read from the store "
                      f"({STORE_FILE} under PEFTLAB_HOME)", flush=True)
        ctx.accelerator.end_training()
    return ctx.run_dir


def prepare(cfg: RunConfig, select: bool = False) -> RunContext:
    """Seed, read and split the data, load the base model, and encode every split.

    `select`: a tuning trial or selection point, judged on val, so a k-fold val fold stays val for every method.
    """
    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    method = get_method(cfg.method.name)
    parts = task_parts(cfg, method, select)
    accelerator, device, dtype = accelerator_and_dtype(cfg, method)
    loaded = load_model(
        cfg.model.name,
        device=device,
        dtype=dtype,
        chat=cfg.model.chat,
        allow_pickle=cfg.model.allow_pickle,
        quantize=cfg.method.quant if method.quantized else None,
    )
    check_max_length(loaded, cfg.data.max_length)
    ctx = RunContext(cfg, method, parts, loaded, format_for(loaded), accelerator, started)
    _encode(ctx)
    return ctx


def task_parts(cfg: RunConfig, method: Method, select: bool = False) -> list[Part]:
    """The run's tasks with their splits: one part for a single task, one per task for a mixture.

    A split too small to fill the test split is an error before anything is written: a run scored on nothing would
    otherwise finish with exit 0 and a metrics.json that holds only the task's name.
    """
    if is_mixture(cfg.data):
        if cfg.data.target != "gold" or method.default_shots or method.build is not None or cfg.experiments.probe:
            raise PeftlabError(
                "a mixture trains on gold targets, without few-shot demos, the linear head or the brittleness probe"
            )
        parts = load_parts(cfg.data, parse_mixture(cfg.data), val_in_train=not (method.trains or select))
    else:
        task = task_for(cfg.data)
        if task.relabel is not None and cfg.data.labels is None:  # alpaca, chat: labels from the training outputs
            cfg.data.labels = list(data_labels(cfg.data, task))  # saved with config.yaml: the run says which it used
            task = task.relabel(tuple(cfg.data.labels))
        # A final run of a method that trains nothing has no use for a k-fold val fold: it joins the demo pool.
        # A selection point of the same method is judged on that fold, so there it stays val.
        parts = [single_part(cfg.data, task, load_splits(cfg.data, task, val_in_train=not (method.trains or select)))]
    for part in parts:
        sizes = {split: len(examples) for split, examples in part.splits.items()}
        where = part.entry.path or cfg.data.test or cfg.data.train or DEFAULT_DATA.get(part.task.name, part.task.name)
        if not sizes["test"]:
            raise PeftlabError(
                f"{where}: the test split is empty ({sizes['train']} train, {sizes['val']} val); "
                f"add examples or raise the test share of data.split (now {list(cfg.data.split)})"
            )
        if method.trains and not sizes["val"] and method.build is None:
            print(f"warning: {where}: the val split is empty, so no epoch is selected and no early stop happens",
                  file=sys.stderr)
    return parts


def _encode(ctx: RunContext) -> None:
    """Training items (teacher targets where configured, or a mixture's sampled draw), and each part's val/test."""
    cfg, fmt = ctx.cfg, ctx.fmt
    if len(ctx.parts) > 1:
        ctx.train, ctx.train_mix = sample_train(ctx.parts, fmt, cfg.data.max_length, cfg.data.seed,
                                                cfg.data.too_long)
        ctx.dropped = sum(ctx.train_mix.values()) - len(ctx.train)
    else:
        part = ctx.parts[0]
        # teacher outputs replace gold
        examples = resolve_targets(cfg.data, cfg.output_dir, part.task, part.splits["train"])
        ctx.train, ctx.train_examples = encode_train(cfg.data, part.task, fmt, examples)
        ctx.dropped = len(examples) - len(ctx.train)
        ctx.train_mix = {part.task.name: len(ctx.train)}
    shots_k = ctx.method.shots(cfg.data.shots)
    for part in ctx.parts:
        template = part.entry.templates[0]
        shots = few_shot_demos(part.task, part.splits["train"], shots_k, cfg.data.seed, template)
        for split in ("val", "test"):
            ctx.enc[(part.key, split)] = encode_split(cfg.data, part.task, fmt, part.splits[split], shots, template)
        ctx.enc[(part.key, "content_free")] = content_free_items(
            cfg.data, part.task, fmt, part.splits["train"], shots, template
        )
    _log_cuts(ctx)


def _log_cuts(ctx: RunContext) -> None:
    """Say how many rows were cut to data.max_length and how many training rows were dropped (result.json keeps
    both counts). A dropped row is a warning: the model trains on less than the file holds."""
    if not ctx.accelerator.is_main_process:
        return
    cut = sum(e.truncated > 0 for items in [ctx.train, *ctx.enc.values()] for e in items)
    if cut:
        print(f"{cut} example(s) cut to data.max_length {ctx.cfg.data.max_length} (a context at its end, a "
              "conversation at its oldest turns)", flush=True)
    if ctx.dropped:
        print(f"warning: {ctx.dropped} training row(s) left out: over data.max_length {ctx.cfg.data.max_length} "
              "even cut (set data.too_long: error to stop on them instead)", file=sys.stderr)


def train_model(ctx: RunContext, model: torch.nn.Module, on_epoch_end=None) -> dict:
    """Run the gradient loop, or fit the linear head, or nothing (zero/few-shot); returns the training summary."""
    summary: dict = {
        "train_steps": 0,
        "train_seconds": 0.0,
        "tokens_per_s": None,
        "last_train_loss": None,
        "best_val_loss": None,
    }
    if not ctx.method.trains:
        return summary
    if not ctx.train:
        raise PeftlabError("the train split is empty; check data.path, data.split and data.limit_train")
    first = ctx.parts[0]  # validation (best checkpoint, early stopping, pruning) follows the first task
    if ctx.method.build is not None:  # the linear head: one feature pass and a convex fit, no gradient loop
        return fit_head(ctx.cfg.method, model, first.task, ctx.fmt, ctx.train, ctx.train_examples)
    data = FitData(first.task, ctx.fmt, ctx.train, ctx.enc[(first.key, "val")], first.splits["val"], ctx.method)
    # keep_checkpoint: the finished training stays on disk until result.json is written (see `finish`).
    return fit(ctx.cfg, model, ctx.loaded, data, ctx.run_dir, ctx.accelerator, on_epoch_end, keep_checkpoint=True)


def score_parts(ctx: RunContext, model: torch.nn.Module, best_val: dict | None) -> tuple[dict, list[dict]]:
    """Val and test metrics of every part, and the test prediction rows (tagged by task in a mixture), computed in
    the run's scoring precision (`scoring_precision`).

    `best_val`: the kept epoch's val metrics from training; they stand for a single task's val split unless
    calibration changes the scores.
    """
    metrics: dict = {}
    rows: list[dict] = []
    bf16 = ctx.scoring is not None and ctx.scoring.autocast == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        for part in ctx.parts:
            content_free = ctx.enc[(part.key, "content_free")]
            for split in ("val", "test"):
                items = ctx.enc[(part.key, split)]
                how = split_scoring(ctx, part, split, best_val)
                if how == "skip":
                    continue
                if how == "kept":
                    m, r = best_val, []
                else:
                    # Zero-shot, few-shot and the head read the unchanged base: their passes are shared.
                    m, r = evaluate(model, ctx.fmt, part.task, part.splits[split], items, split=split,
                                    content_free=content_free, frozen=ctx.method.reads_frozen_base)
                metrics.update({part.metric(split, k): v for k, v in m.items() if k not in ("task", "split")})
                if split == "test":
                    rows += [{**row, "task": part.task.name} for row in r] if part.key else r
    return metrics, rows


def split_scoring(ctx: RunContext, part: Part, split: str, best_val: dict | None) -> str:
    """How `score_parts` gets a split's metrics: "score" (a pass over its items), "kept" (the kept epoch's val
    metrics from training stand for it: a single task's val, uncalibrated) or "skip"."""
    if not ctx.enc[(part.key, split)] or (split == "val" and not ctx.score_val and not best_val):
        return "skip"
    if split == "val" and best_val and not ctx.enc[(part.key, "content_free")] and len(ctx.parts) == 1:
        return "kept"
    return "score"


def scoring_precision(ctx: RunContext, model: torch.nn.Module, best_val: dict | None = None) -> PrecisionChoice:
    """What the run's scoring computes in: fp32, or under `train.mixed_precision: auto` on a CPU, bf16 where a
    probe measures it faster on the first test batch and with the same answers on the first `SCORING_ROWS` test
    items (`measure_scoring`). The answer is cached per model, method, task, labels and shape: another adapter of
    the same method reuses it. A run that scores too few items to pay for the probe (`scoring_probe_items`) keeps
    fp32 unless an answer is cached. `best_val`: as `score_parts` takes it."""
    cfg, part = ctx.cfg, ctx.parts[0]
    items = ctx.enc[(part.key, "test")] or ctx.enc[(part.key, "val")]
    if ctx.method.build is not None:
        return PrecisionChoice("fp32", "configured", "the linear head scores the fp32 states it was fitted on")
    if cfg.train.mixed_precision != "auto" or ctx.accelerator.device.type != "cpu" or not items:
        return PrecisionChoice("fp32", "configured", "scoring is probed under train.mixed_precision: auto on a "
                               f"CPU; this run has {cfg.train.mixed_precision} on {ctx.accelerator.device.type}")
    if len(ctx.parts) > 1:
        return PrecisionChoice("fp32", "configured", "a mixture's parts are scored in fp32: the probe reads one task")
    if pinned() is not None:
        return pinned()
    labels = part.task.labels if part.task.kind == "classification" else ()
    first, answers, (rows, tokens) = probe_batches(model, ctx.fmt, items, labels, SCORING_ROWS)
    # The answers checked belong to this task and label set: another task's agreement says nothing about these.
    what = f"{part.task.name} labels {'/'.join(labels)}" if labels else f"{part.task.name} first generated token"
    key = f"{cfg.model.name} | {cfg.method.name} | {what} | {-(-rows // 64) * 64}x{-(-tokens // 64) * 64}"
    scored = sum(len(ctx.enc[(part.key, s)]) for s in ("val", "test")
                 if split_scoring(ctx, part, s, best_val) == "score")
    if scored < scoring_probe_items(rows) and cached(key) is None:
        return PrecisionChoice("fp32", "not measured", f"this run scores {scored} items, under the "
                               f"{scoring_probe_items(rows)} on which the scoring probe ({SCORING_ROWS} items in fp32 "
                               f"and in bf16, and timed batches of {rows} rows) can pay for itself")
    return choose(key, lambda: measure_scoring(model, first, answers))


def finish(ctx: RunContext, model: torch.nn.Module, summary: dict, params: tuple[int, int]) -> None:
    """Test evaluation and the run folder: metrics, predictions, the saved adapter and result.json (written last)."""
    cfg, first, trains = ctx.cfg, ctx.parts[0], ctx.method.trains
    best_val = summary.pop("best_val_metrics", None)
    ctx.scoring = scoring_precision(ctx, model, best_val)
    metrics, rows = score_parts(ctx, model, best_val)
    metrics.update(run_experiments(cfg, ctx.method, model, ctx.fmt, first.task, first.splits, ctx.run_dir))
    val = ctx.enc[(first.key, "val")] if ctx.score_val else []
    if summary["best_val_loss"] is None and val and not trains:
        summary["best_val_loss"] = mean_loss(model, ctx.loaded.kind, val, ctx.fmt.tokenizer.pad_token_id)
    adapter_bytes = save_trained(model, ctx.loaded, ctx.method, ctx.run_dir) if trains else 0
    mixture = len(ctx.parts) > 1
    task_name = "mix:" + "+".join(p.task.name for p in ctx.parts) if mixture else first.task.name
    write_json(ctx.run_dir / "metrics.json", {"task": task_name, **metrics})
    write_jsonl(ctx.run_dir / "predictions.jsonl", rows)
    trainable, total = params
    result = RunResult(
        name=cfg.name,
        method=cfg.method.name,
        task=task_name,
        model=cfg.model.name,
        task_kind="mixture" if mixture else first.task.kind,
        # A mixture's is the first task's, like its validation.
        primary_metric=f"{first.key}_{first.task.primary_metric}" if mixture else first.task.primary_metric,
        trainable_params=trainable if trains else 0,
        total_params=total,
        trainable_pct=100 * trainable / total if trains else 0.0,
        adapter_bytes=adapter_bytes,
        **summary,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        # Bytes of the weights as stored (a 4-bit base at its packed size): what QLoRA saves, apart from activations.
        weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        wall_seconds=time.perf_counter() - ctx.started,
        truncated_examples=sum(e.truncated > 0 for items in [ctx.train, *ctx.enc.values()] for e in items),
        dropped_examples=ctx.dropped,
        train_mix=ctx.train_mix,
        # Why this run went without peftlab's speed paths (a tuner not checked against them), or None.
        plain_path=plain_path_reason(ctx.method, cfg.method),
        scoring_precision=asdict(ctx.scoring),
        frozen_pass=STATS.to_dict() if STATS.prompts else None,
        metrics=metrics,
        versions=versions(),
    )
    write_result(ctx.run_dir, result)  # written last: its presence marks the run complete
    (ctx.run_dir / CHECKPOINT).unlink(missing_ok=True)  # kept until now: a failed save above resumes past training
