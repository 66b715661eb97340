"""Training: one short loop on `accelerate.Accelerator`, read top to bottom.

    config -> task data and splits -> base model -> method -> encode -> train (AdamW, warmup + schedule, clipping,
    accumulation, per-epoch val loss and metric, early stopping, best checkpoint) -> test evaluation -> run folder

A plain loop rather than `transformers.Trainer`, because the speed tricks live in the batch layout: rows
right-padded with no attention mask (SDPA's causal kernel), the LM head only at target positions, length-bucketed
batches sized by tokens, pieces of at most `train.micro_tokens` for backward, and the prompt opening all rows of a
step share run once (`step.train_step`). Prompt-learning methods and vision-language models keep the masked layout
with left-padded prompts (`data.collate_causal`). Run it data-parallel unchanged with `accelerate launch` (or
`torchrun` on CPU).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab.checkpoint import CHECKPOINT, TrainState, load_checkpoint, save_checkpoint, trainable_state
from peftlab.config import RunConfig, save_config
from peftlab.data import (
    Encoded,
    PromptFormat,
    encode,
    example_weights,
    few_shot_demos,
    token_batches,
)
from peftlab.errors import PeftlabError
from peftlab.evaluate import batch_tokens, evaluate, mean_loss, right_padded_ok
from peftlab.io import write_json, write_jsonl
from peftlab.memory import enable_checkpointing, fused_rmsnorm, lean_swiglu
from peftlab.methods import apply_method, count_params, get_method
from peftlab.models import LoadedModel, load_model
from peftlab.runtime import accelerator_and_dtype, peak_rss_mb, precision, seed_everything, versions
from peftlab.step import micro_tokens, shares_prefix, split_rows, step_inputs, train_step
from peftlab.tasks import DEFAULT_DATA, Example, Task, get_task, kfold_examples, split_examples


def load_splits(cfg: RunConfig, task: Task) -> dict[str, list[Example]]:
    """The task's examples, split deterministically (or by k-fold), with the configured limits applied."""
    path = Path(cfg.data.path or DEFAULT_DATA.get(task.name, ""))
    if not path.is_file():
        raise PeftlabError(f"{path}: no such data file (set data.path)")
    examples = task.load(path)
    if cfg.data.fold is not None:
        splits = kfold_examples(examples, cfg.data.folds, cfg.data.fold, cfg.data.seed)
        if not get_method(cfg.method.name).trains:  # nothing selects on the val fold: it joins the demo pool
            splits = {"train": splits["train"] + splits["val"], "val": [], "test": splits["test"]}
    else:
        splits = split_examples(examples, tuple(cfg.data.split), cfg.data.seed, stratify=task.kind == "classification")
    if cfg.data.limit_train:
        splits["train"] = splits["train"][: cfg.data.limit_train]
    if cfg.data.limit_eval:
        splits["val"] = splits["val"][: cfg.data.limit_eval]
        splits["test"] = splits["test"][: cfg.data.limit_eval]
    return splits


def encode_split(cfg: RunConfig, task: Task, fmt: PromptFormat, examples, shots=()) -> list[Encoded]:
    return [encode(task, ex, fmt, cfg.data.max_length, cfg.data.template, shots) for ex in examples]


CONTENT_FREE = ("N/A", "[MASK]", "")  # Zhao et al.'s content-free inputs


def content_free_items(cfg: RunConfig, task: Task, fmt: PromptFormat, train, shots=()) -> list[Encoded]:
    """With data.calibrate, the prompt with every input field content-free, same phrasing and demos (else none)."""
    if not cfg.data.calibrate or task.kind != "classification" or not train:
        return []
    examples = [
        Example(f"content-free-{i}", {k: text for k in train[0].inputs}, train[0].target, train[0].references)
        for i, text in enumerate(CONTENT_FREE)
    ]
    return encode_split(cfg, task, fmt, examples, shots)


def _scheduler(cfg: RunConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class NonFiniteLoss(PeftlabError):
    pass


def fit(
    cfg: RunConfig,
    model,
    loaded: LoadedModel,
    task: Task,
    fmt,
    train: list[Encoded],
    val: list[Encoded],
    val_examples: list[Example],
    run_dir: Path,
    accelerator,
    on_epoch_end=None,
) -> dict:
    """The training loop. Returns a summary (steps, seconds, tokens/s, losses); leaves the best weights in `model`.

    `on_epoch_end(epoch, val_row)` is called after each epoch's validation (a sweep reports to Optuna there and
    may raise `optuna.TrialPruned` to stop a hopeless trial).
    """
    tc = cfg.train
    pad = fmt.tokenizer.pad_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    lr = tc.lr or get_method(cfg.method.name).default_lr
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)
    batches_per_epoch = len(token_batches(train, tc.batch_tokens, tc.batch_size)) // world
    steps_per_epoch = max(batches_per_epoch // tc.grad_accum, 1)
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    scheduler = _scheduler(cfg, optimizer, total_steps)
    # The scheduler stays outside accelerate: its wrapper steps once per process, but total_steps already counts
    # per-process steps, so with 2 processes the learning rate would reach zero halfway through.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # Unmasked right-padded rows where the model allows: SDPA's causal kernel, no key/value copies per head.
    right = right_padded_ok(raw, loaded.kind, train)
    share = shares_prefix(cfg, right, world, accelerator.device)
    piece_tokens = micro_tokens(tc.micro_tokens, accelerator.device)
    _, autocast = precision(cfg, get_method(cfg.method.name), accelerator.device.type)
    weights = example_weights(task, fmt, train, tc.class_balance)
    s = TrainState()
    ckpt = run_dir / CHECKPOINT
    if tc.resume and ckpt.exists():
        s = load_checkpoint(ckpt, raw, optimizer, scheduler)
        print(f"resuming {cfg.name} from {ckpt} at step {s.step}", flush=True)
    bar = tqdm(
        total=total_steps,
        initial=s.step,
        desc=f"train {cfg.name}",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    for epoch in range(s.epoch, math.ceil(total_steps / steps_per_epoch)):
        s.epoch = epoch
        model.train()
        # A fresh, seeded order every epoch: unshuffled training was measured worse for prompt tuning.
        order = token_batches(train, tc.batch_tokens, tc.batch_size, seed=tc.seed * 1000 + epoch)
        shard = order[: batches_per_epoch * world][rank::world]
        for start in range(s.start, steps_per_epoch * tc.grad_accum, tc.grad_accum):
            t0 = time.perf_counter()
            # Pieces under a token budget bound the activation memory; the step's gradient is the same.
            batch_rows = shard[start : start + tc.grad_accum]
            pieces = [p for idx in batch_rows for p in split_rows(train, idx, piece_tokens)]
            micro, prefix_ids = step_inputs(train, pieces, loaded.kind, pad, right, share)
            if weights is not None:
                for piece, batch in zip(pieces, micro, strict=True):
                    batch["row_weights"] = torch.tensor([weights[i] for i in piece])
            loss = train_step(model, micro, loaded.kind, accelerator, params, optimizer, scheduler, tc.max_grad_norm,
                              prefix_ids, autocast)
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
            accelerator.log({"train/loss": loss, "train/lr": entry["lr"]}, step=s.step)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{s.tokens / s.seconds:.0f}")
            bar.update(1)
            if tc.checkpoint_every and s.step % tc.checkpoint_every == 0 and accelerator.is_main_process:
                save_checkpoint(ckpt, s, raw, optimizer, scheduler)
            if s.step >= total_steps:
                break
        s.start = 0
        if (
            tc.eval_every_epoch
            and val
            and _end_of_epoch(cfg, s, raw, loaded, task, fmt, val, val_examples, bar, accelerator, on_epoch_end)
        ):
            break
        if s.step >= total_steps:
            break
    bar.close()
    if s.best_state is not None:  # keep the best checkpoint, not the last
        raw.load_state_dict(s.best_state, strict=False)
    if accelerator.is_main_process:
        write_jsonl(run_dir / "train_log.jsonl", s.log)
        ckpt.unlink(missing_ok=True)  # the run is complete; result files take over
    return {
        "train_steps": s.step,
        "train_seconds": s.seconds,
        "tokens_per_s": s.tokens / s.seconds if s.seconds else None,
        "last_train_loss": s.last_loss,
        "best_val_loss": None if s.best_state is None else s.best_val_loss,
        "best_epoch": s.best_epoch,
        "best_val_metrics": s.best_val_metrics if s.best_state is not None else None,
        "lr": lr,
    }


def _end_of_epoch(
    cfg, s: TrainState, model, loaded, task, fmt, val, val_examples, bar, accelerator, on_epoch_end
) -> bool:
    """Validate, keep the best weights, and decide on early stopping (returns True to stop)."""
    val_row, val_metrics = _validate(cfg, model, loaded, task, fmt, val, val_examples, s.step, s.epoch + 1)
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


def _validate(cfg, model, loaded, task, fmt, val, val_examples, step, epoch) -> tuple[dict, dict | None]:
    """Val loss and the task metric, plus the full val metrics when the whole split was scored.

    Generation tasks score at most 32 val items to keep epochs cheap; their final val scores are computed again.
    """
    row = {"step": step, "epoch": epoch, "val_loss": mean_loss(model, loaded.kind, val, fmt.tokenizer.pad_token_id)}
    n = len(val) if task.kind == "classification" else min(len(val), 32)
    metrics, _ = evaluate(model, fmt, task, val_examples[:n], val[:n], split="val", progress=False)
    row[f"val_{task.primary_metric}"] = metrics[task.primary_metric]
    model.train()
    return row, (metrics if n == len(val) else None)


def save_trained(model, loaded: LoadedModel, method: str, run_dir: Path) -> int:
    """Save the adapter (a standard peft folder) or, for full fine-tuning, the model folder; returns bytes on disk."""
    if method == "linear-head":
        from peftlab.heads import save_head

        return save_head(model, loaded.name, run_dir)
    out = run_dir / "adapter" if method != "full" else run_dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    if method == "full":  # a vision-language model's processor holds its tokenizer and image settings
        (loaded.processor or loaded.tokenizer).save_pretrained(out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def run_training(cfg: RunConfig, on_epoch_end=None) -> Path:
    """Train (or, for zero/few-shot, only evaluate) one method and write its run folder."""
    if cfg.data.mixture or cfg.data.task.startswith("mix:"):  # multi-task mix: a recipe built from the pieces here
        from peftlab.tasks.mixture import run_mixture_training

        return run_mixture_training(cfg, on_epoch_end)

    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    method = get_method(cfg.method.name)
    task = get_task(cfg.data.task)
    splits = load_splits(cfg, task)
    run_dir = cfg.run_dir
    accelerator, device, dtype = accelerator_and_dtype(cfg, method)
    loaded = load_model(
        cfg.model.name,
        device=device,
        dtype=dtype,
        chat=cfg.model.chat,
        allow_pickle=cfg.model.allow_pickle,
        quantize=cfg.method.quant if method.quantized else None,
    )
    fmt = PromptFormat.for_model(loaded)
    shots_k = cfg.data.shots or (3 if method.name == "few-shot" else 0)
    shots = few_shot_demos(task, splits["train"], shots_k, cfg.data.seed, cfg.data.template)
    from peftlab.distill import resolve_targets  # teacher outputs replace gold labels when configured

    train_examples = resolve_targets(cfg, task, splits["train"])
    enc = {
        "train": encode_split(cfg, task, fmt, train_examples),
        "val": encode_split(cfg, task, fmt, splits["val"], shots),
        "test": encode_split(cfg, task, fmt, splits["test"], shots),
        "content_free": content_free_items(cfg, task, fmt, splits["train"], shots),
    }
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if cfg.train.report_to:
            accelerator.init_trackers(cfg.name)
    enable_checkpointing(loaded.model, cfg.train.activation_checkpointing)
    lean_swiglu(loaded.model)  # the gated MLPs keep two tensors for backward, not three: same gradients
    fused_rmsnorm(loaded.model)  # one fused kernel per norm instead of five ops: same outputs
    model = apply_method(loaded, task, cfg.method)
    trainable, total = count_params(model)
    summary: dict = {
        "train_steps": 0,
        "train_seconds": 0.0,
        "tokens_per_s": None,
        "last_train_loss": None,
        "best_val_loss": None,
    }
    if method.trains:
        if not enc["train"]:
            raise PeftlabError("the train split is empty; check data.path, data.split and data.limit_train")
        if method.build is not None:  # the linear head: one feature pass and a convex fit, no gradient loop
            from peftlab.heads import fit_head

            summary = fit_head(cfg, model, task, fmt, enc["train"], train_examples)
            trainable += sum(h.n_params for h in model.text_heads)  # fitted outside torch, so not counted above
        else:
            summary = fit(
                cfg, model, loaded, task, fmt, enc["train"], enc["val"], splits["val"], run_dir, accelerator,
                on_epoch_end,
            )
    accelerator.wait_for_everyone()
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        _finish(cfg, raw, loaded, task, fmt, splits, enc, run_dir, summary, trainable, total, started)
    accelerator.end_training()
    return run_dir


def _finish(cfg, model, loaded, task, fmt, splits, enc, run_dir, summary, trainable, total, started) -> None:
    """Test evaluation and the run folder: metrics, predictions, the saved adapter and result.json."""
    metrics: dict = {}
    rows: list[dict] = []
    best_val = summary.pop("best_val_metrics", None)
    for split in ("val", "test"):
        if not enc[split]:
            continue
        if split == "val" and best_val and not enc["content_free"]:  # the kept epoch's val scores stand
            m, r = best_val, []
        else:
            m, r = evaluate(model, fmt, task, splits[split], enc[split], split=split, content_free=enc["content_free"])
        metrics.update({f"{split}_{k}": v for k, v in m.items() if k not in ("task", "split")})
        if split == "test":
            rows = r
    from peftlab.experiments import run_experiments  # forgetting / brittleness probes, when configured

    metrics.update(run_experiments(cfg, model, fmt, task, splits, run_dir))
    if summary["best_val_loss"] is None and enc["val"] and get_method(cfg.method.name).trains is False:
        summary["best_val_loss"] = mean_loss(model, loaded.kind, enc["val"], fmt.tokenizer.pad_token_id)
    adapter_bytes = save_trained(model, loaded, cfg.method.name, run_dir) if get_method(cfg.method.name).trains else 0
    write_json(run_dir / "metrics.json", {"task": task.name, **metrics})
    write_jsonl(run_dir / "predictions.jsonl", rows)
    truncated = sum(e.truncated > 0 for split in enc.values() for e in split)
    result = {
        "name": cfg.name,
        "method": cfg.method.name,
        "task": task.name,
        "model": cfg.model.name,
        "task_kind": task.kind,
        "primary_metric": task.primary_metric,
        "trainable_params": trainable if get_method(cfg.method.name).trains else 0,
        "total_params": total,
        "trainable_pct": 100 * trainable / total if get_method(cfg.method.name).trains else 0.0,
        "adapter_bytes": adapter_bytes,
        **summary,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        # Bytes of the weights as stored (a 4-bit base at its packed size): what QLoRA saves, apart from activations.
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "wall_seconds": time.perf_counter() - started,
        "truncated_examples": truncated,
        "metrics": metrics,
        "versions": versions(),
    }
    write_json(run_dir / "result.json", result)  # written last: its presence marks the run complete
