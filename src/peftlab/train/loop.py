"""The training loop: one short loop on `accelerate.Accelerator`, read top to bottom.

    encoded train split -> AdamW, warmup + schedule, clipping, accumulation -> per-epoch val loss and metric ->
    early stopping -> the best weights left in the model

The recipe around it (`peftlab.recipes.train_run`) loads the data, the model and the method, and writes the run folder.

A plain loop rather than `transformers.Trainer`, because the speed tricks live in the batch layout: rows
right-padded with no attention mask (SDPA's causal kernel), the LM head only at target positions, length-bucketed
batches sized by tokens, pieces of at most `train.micro_tokens` for backward, and the prompt opening all rows of a
step share run once (`train.step.train_step`). Prompt-learning methods and vision-language models keep the masked
layout with left-padded prompts (`prompts.batches.collate_causal`). Run it data-parallel unchanged with
`accelerate launch` (or `torchrun` on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from peftlab.core.config import RunConfig, flat_settings
from peftlab.core.errors import PeftlabError
from peftlab.core.files import append_jsonl, write_jsonl
from peftlab.core.signals import Stopped, signal_name, stop_deferred, stop_pending, take_stop
from peftlab.data.tasks import Example, Task
from peftlab.evaluate.scoring import mean_loss
from peftlab.evaluate.split_scoring import evaluate
from peftlab.methods.registry import Method, start_schedule
from peftlab.models.forward import target_loss, weighted_targets
from peftlab.models.hf_folder import LoadedModel
from peftlab.prompts.batches import batch_tokens, right_padded_ok, token_batches
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.weights import example_weights
from peftlab.train.checkpoint import (
    CHECKPOINT,
    TrainState,
    check_resumable,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
    trainable_state,
)
from peftlab.train.measured_precision import PrecisionChoice, choose, measure, pinned
from peftlab.train.runtime import precision
from peftlab.train.step import micro_tokens, shares_prefix, split_rows, step_inputs, train_step


@dataclass
class FitData:
    """What the loop trains on and validates against, encoded for one model."""

    task: Task
    fmt: PromptFormat
    train: list[Encoded]
    val: list[Encoded]
    val_examples: list[Example]  # the examples behind `val`, for the task metric
    method: Method  # what trains: its default lr and whether it trains the base (precision)


def _scheduler(cfg: RunConfig, optimizer, total_steps: int):
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class NonFiniteLoss(PeftlabError):
    pass


def fit(
    cfg: RunConfig,
    model: torch.nn.Module,
    loaded: LoadedModel,
    data: FitData,
    run_dir: Path,
    accelerator,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    keep_checkpoint: bool = False,
) -> dict:
    """The training loop. Returns a summary (steps, seconds, tokens/s, losses); leaves the best weights in `model`.

    `on_epoch_end(epoch, val_row)` is called after each epoch's validation (a sweep reports to Optuna there and
    may raise `optuna.TrialPruned` to stop a hopeless trial). With `keep_checkpoint` the finished state is saved as
    a last checkpoint and left for the caller to delete once its results are written: a run that dies while saving
    them (a full disk, a SIGTERM) resumes with no training left. A SIGTERM or SIGINT under `core.signals` stops
    after the current step, with a checkpoint of it.
    """
    tc, train, fmt = cfg.train, data.train, data.fmt
    pad = fmt.tokenizer.pad_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    lr = tc.lr or data.method.default_lr
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)
    batches_per_epoch = len(token_batches(train, tc.batch_tokens, tc.batch_size)) // world
    steps_per_epoch = max(batches_per_epoch // tc.grad_accum, 1)
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    scheduler = _scheduler(cfg, optimizer, total_steps)
    start_schedule(model, optimizer, total_steps)  # a tuner that follows the step count: AdaLoRA's rank budget
    # The scheduler stays outside accelerate: its wrapper steps once per process, but total_steps already counts
    # per-process steps, so with 2 processes the learning rate would reach zero halfway through.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # Unmasked right-padded rows where the model allows: SDPA's causal kernel, no key/value copies per head.
    right = right_padded_ok(raw, loaded.kind, train)
    share = shares_prefix(cfg, right, world, accelerator.device)
    piece_tokens = micro_tokens(tc.micro_tokens, accelerator.device)
    _, autocast = precision(cfg, data.method, accelerator.device.type)
    weights = example_weights(data.task, fmt, train, tc.class_balance)
    settings = resume_settings(flat_settings(cfg))
    s = TrainState(settings=settings)
    ckpt = run_dir / CHECKPOINT
    if tc.resume and ckpt.exists():
        s = load_checkpoint(ckpt, raw, optimizer, scheduler)
        check_resumable(ckpt, s, settings)
        s.settings = settings  # an older peftlab's checkpoint has none: its next checkpoint has them
        s.resumed_at.append(s.step)
        finished = "; training had finished, so only the results are written" if s.done else ""
        print(f"resuming {cfg.name} from {ckpt} at step {s.step}{finished}", flush=True)
    # A resumed run keeps the precision it started in, even on another machine.
    s.precision = s.precision or asdict(_precision_choice(cfg, model, loaded.kind, train, pad, right, autocast,
                                                          accelerator.device.type))
    autocast = torch.bfloat16 if s.precision["autocast"] == "bf16" else None
    log = run_dir / "train_log.jsonl"
    if accelerator.is_main_process:  # the log as of the checkpoint (empty on a fresh start), then a line per step
        write_jsonl(log, s.log)
    bar = tqdm(
        total=total_steps,
        initial=s.step,
        desc=f"train {cfg.name}",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    # A SIGTERM or Ctrl-C waits for the end of the step (stop_deferred): the checkpoint then holds whole steps.
    # The bar closes on the way out too, so a stop's one-line message starts a line of its own.
    with stop_deferred(), bar:
        for epoch in range(s.epoch, 0 if s.done else math.ceil(total_steps / steps_per_epoch)):
            s.epoch = epoch
            model.train()
            # A fresh, seeded order every epoch: unshuffled training was measured worse for prompt tuning.
            order = token_batches(train, tc.batch_tokens, tc.batch_size, seed=tc.seed * 1000 + epoch)
            shard = order[: batches_per_epoch * world][rank::world]
            for start in range(s.start, steps_per_epoch * tc.grad_accum, tc.grad_accum):
                if s.step >= total_steps:  # resumed from a checkpoint of the last step: no step is left
                    break
                t0 = time.perf_counter()
                # Pieces under a token budget bound the activation memory; the step's gradient is the same.
                batch_rows = shard[start : start + tc.grad_accum]
                pieces = [p for idx in batch_rows for p in split_rows(train, idx, piece_tokens)]
                micro, prefix_ids = step_inputs(train, pieces, loaded.kind, pad, right, share)
                if weights is not None:
                    for piece, batch in zip(pieces, micro, strict=True):
                        batch["row_weights"] = torch.tensor([weights[i] for i in piece])
                loss = train_step(model, micro, loaded.kind, accelerator, params, optimizer, scheduler,
                                  tc.max_grad_norm, prefix_ids, autocast)
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"loss became {loss} at step {s.step + 1}; lower train.lr (now {lr})")
                dt = time.perf_counter() - t0
                step_tokens = (sum(batch_tokens(b) for b in micro) + len(prefix_ids) * sum(map(len, pieces))) * world
                s.step, s.start, s.last_loss = s.step + 1, start + tc.grad_accum, loss
                s.tokens, s.seconds = s.tokens + step_tokens, s.seconds + dt
                entry = {
                    "step": s.step,
                    "epoch": round(epoch + s.start / tc.grad_accum / steps_per_epoch, 4),
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": step_tokens / dt,
                }
                s.log.append(entry)
                if accelerator.is_main_process:
                    append_jsonl(log, entry)  # a crash leaves every finished step in the log
                accelerator.log({"train/loss": loss, "train/lr": entry["lr"]}, step=s.step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{s.tokens / s.seconds:.0f}")
                bar.update(1)
                if tc.checkpoint_every and s.step % tc.checkpoint_every == 0 and accelerator.is_main_process:
                    save_checkpoint(ckpt, s, raw, optimizer, scheduler)
                if stop_pending() is not None:
                    _stop_after_step(cfg, s, ckpt, (raw, optimizer, scheduler), accelerator)
                if s.step >= total_steps:
                    break
            s.start = 0
            if tc.eval_every_epoch and data.val:
                stop = _end_of_epoch(cfg, s, raw, loaded, data, bar, accelerator, on_epoch_end)
                if accelerator.is_main_process:
                    append_jsonl(log, s.log[-1])  # the epoch's val row
                if stop:
                    break
            if s.step >= total_steps:
                break
        bar.close()
        if s.best_state is not None:  # keep the best checkpoint, not the last
            raw.load_state_dict(s.best_state, strict=False)
        if accelerator.is_main_process:
            write_jsonl(log, s.log)  # the whole log once more, atomically
            if not keep_checkpoint:
                ckpt.unlink(missing_ok=True)  # the caller has no result files to wait for
            elif tc.checkpoint_every and not s.done:  # finished training stays on disk until the results are
                s.done = True
                save_checkpoint(ckpt, s, raw, optimizer, scheduler)
    return {
        "train_steps": s.step,
        "train_seconds": s.seconds,
        "tokens_per_s": s.tokens / s.seconds if s.seconds else None,
        "last_train_loss": s.last_loss,
        "best_val_loss": None if s.best_state is None else s.best_val_loss,
        "best_epoch": s.best_epoch,
        "best_val_metrics": s.best_val_metrics if s.best_state is not None else None,
        "lr": lr,
        "resumed_at": s.resumed_at,
        "precision": s.precision,
    }


def _precision_choice(cfg: RunConfig, model, kind: str, train: list, pad: int, right: bool, autocast, device: str
                      ) -> PrecisionChoice:
    """The precision the run trains in: as configured, or with `mixed_precision: auto` on a CPU, measured on the
    run's first batch (`train.measured_precision`)."""
    if cfg.train.mixed_precision != "auto" or device != "cpu":
        why = f"train.mixed_precision: {cfg.train.mixed_precision} on {device}"
        return PrecisionChoice("bf16" if autocast is not None else "fp32", "configured", why)
    if pinned() is not None:
        return pinned()
    first = token_batches(train, cfg.train.batch_tokens, cfg.train.batch_size, seed=cfg.train.seed * 1000)[0]
    (batch,), _ = step_inputs(train, [first], kind, pad, right, share=False)
    rows, tokens = batch["input_ids"].shape
    # Shapes to the next 64: runs that differ by a few tokens of padding share one measurement.
    scope = f"{cfg.model.name} | {cfg.method.name}"
    key = f"{scope} | batch {-(-rows // 64) * 64}x{-(-tokens // 64) * 64}"

    def loss():
        return target_loss(model, kind, batch)[0] / max(1, weighted_targets(batch))

    return choose(key, lambda: measure(model, loss), scope=scope)


def _stop_after_step(cfg: RunConfig, s: TrainState, ckpt: Path, parts: tuple, accelerator) -> NoReturn:
    """A stop signal came during the step just taken: checkpoint it, then stop with a line saying how to go on."""
    signum = take_stop()
    if accelerator.is_main_process:
        save_checkpoint(ckpt, s, *parts)
    raise Stopped(signum, f"{cfg.name}: stopped by {signal_name(signum)} after step {s.step}; its checkpoint is "
                          f"{ckpt}: rerun with --resume to continue from there")


def _end_of_epoch(cfg: RunConfig, s: TrainState, model, loaded: LoadedModel, data: FitData, bar, accelerator,
                  on_epoch_end) -> bool:
    """Validate, keep the best weights, and decide on early stopping (returns True to stop)."""
    val_row, val_metrics = _validate(model, loaded, data, s.step, s.epoch + 1)
    s.log.append(val_row)
    accelerator.log({f"val/{k}": v for k, v in val_row.items() if isinstance(v, float)}, step=s.step)
    bar.write(f"epoch {s.epoch + 1}: val_loss {val_row['val_loss']:.4f}")
    if on_epoch_end is not None:
        on_epoch_end(s.epoch + 1, val_row)
    if val_row["val_loss"] < s.best_val_loss:
        s.best_val_loss, s.best_state, s.best_epoch, s.stale = (
            val_row["val_loss"],
            trainable_state(model),
            s.epoch + 1,
            0,
        )
        s.best_val_metrics = val_metrics
        return False
    s.stale += 1
    if cfg.train.patience is not None and s.stale > cfg.train.patience:
        bar.write(f"early stopping: no val-loss improvement for {s.stale} epochs")
        return True
    return False


def _validate(model, loaded: LoadedModel, data: FitData, step: int, epoch: int) -> tuple[dict, dict | None]:
    """Val loss and the task metric, plus the full val metrics when the whole split was scored.

    Generation tasks score at most 32 val items to keep epochs cheap; their final val scores are computed again.
    """
    task, val = data.task, data.val
    val_loss = mean_loss(model, loaded.kind, val, data.fmt.tokenizer.pad_token_id)
    row = {"step": step, "epoch": epoch, "val_loss": val_loss}
    n = len(val) if task.kind == "classification" else min(len(val), 32)
    metrics, _ = evaluate(model, data.fmt, task, data.val_examples[:n], val[:n], split="val", progress=False)
    row[f"val_{task.primary_metric}"] = metrics[task.primary_metric]
    model.train()
    return row, (metrics if n == len(val) else None)
