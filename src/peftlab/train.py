"""Training: one short loop on `accelerate.Accelerator`, read top to bottom.

    config -> task data and splits -> base model -> method -> encode -> train (AdamW, warmup + schedule, clipping,
    accumulation, per-epoch val loss and metric, early stopping, best checkpoint) -> test evaluation -> run folder

A plain loop rather than `transformers.Trainer`, because the speed tricks live in the batch layout: prompts
left-padded and targets right-padded so the LM head runs only at target positions, and length-bucketed batches
sized by tokens. Run it data-parallel unchanged with `accelerate launch` (or `torchrun` on CPU).
"""

from __future__ import annotations

import math
import platform
import random
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab import __version__
from peftlab.config import RunConfig, save_config
from peftlab.data import Encoded, PromptFormat, collate, encode, few_shot_demos, token_batches
from peftlab.errors import PeftlabError
from peftlab.evaluate import evaluate, mean_loss, target_loss
from peftlab.io import write_json, write_jsonl
from peftlab.methods import apply_method, count_params, get_method
from peftlab.models import LoadedModel, load_model
from peftlab.tasks import DEFAULT_DATA, Example, Task, get_task, kfold_examples, split_examples


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_splits(cfg: RunConfig, task: Task) -> dict[str, list[Example]]:
    """The task's examples, split deterministically (or by k-fold), with the configured limits applied."""
    path = Path(cfg.data.path or DEFAULT_DATA.get(task.name, ""))
    if not path.is_file():
        raise PeftlabError(f"{path}: no such data file (set data.path)")
    examples = task.load(path)
    if cfg.data.fold is not None:
        splits = kfold_examples(examples, cfg.data.folds, cfg.data.fold, cfg.data.seed)
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scheduler(cfg: RunConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


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
) -> dict:
    """The training loop. Returns a summary (steps, seconds, tokens/s, losses); leaves the best weights in `model`."""
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
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    log: list[dict] = []
    best = {"val_loss": math.inf, "state": None, "epoch": 0}
    step, tokens, seconds, last_loss, stale = 0, 0, 0.0, None, 0
    bar = tqdm(total=total_steps, desc=f"train {cfg.name}", unit="step", disable=not accelerator.is_main_process)
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        model.train()
        # A fresh, seeded order every epoch: unshuffled training was measured worse for prompt tuning.
        order = token_batches(train, tc.batch_tokens, tc.batch_size, seed=tc.seed * 1000 + epoch)
        shard = order[: batches_per_epoch * world][rank::world]
        for start in range(0, steps_per_epoch * tc.grad_accum, tc.grad_accum):
            t0 = time.perf_counter()
            micro = [
                collate([train[i] for i in idx], loaded.kind, pad) for idx in shard[start : start + tc.grad_accum]
            ]
            n_tok = sum(int((b["labels"] != -100).sum()) for b in micro)
            loss_sum = 0.0
            for i, batch in enumerate(micro):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # no_sync: gradients are all-reduced once per optimizer step, not per micro-batch
                ctx = accelerator.no_sync(model) if i < len(micro) - 1 else _null()
                with ctx:
                    loss, _ = target_loss(model, loaded.kind, batch)
                    accelerator.backward(loss / n_tok)
                loss_sum += float(loss)
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"loss became {loss_sum} at step {step + 1}; lower train.lr (now {lr})")
            if tc.max_grad_norm:
                accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            step_tokens = sum(int(b["attention_mask"].sum()) for b in micro) * world
            tokens, seconds, last_loss = tokens + step_tokens, seconds + dt, loss_sum / n_tok
            entry = {
                "step": step,
                "epoch": round(epoch + (start // tc.grad_accum + 1) / steps_per_epoch, 4),
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": step_tokens / dt,
            }
            log.append(entry)
            accelerator.log({"train/loss": last_loss, "train/lr": entry["lr"]}, step=step)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            if step >= total_steps:
                break
        if tc.eval_every_epoch and val:
            val_row = _validate(cfg, raw, loaded, task, fmt, val, val_examples, step, epoch + 1)
            log.append(val_row)
            accelerator.log({f"val/{k}": v for k, v in val_row.items() if isinstance(v, float)}, step=step)
            bar.write(f"epoch {epoch + 1}: val_loss {val_row['val_loss']:.4f}")
            if val_row["val_loss"] < best["val_loss"]:
                best = {"val_loss": val_row["val_loss"], "state": _trainable_state(raw), "epoch": epoch + 1}
                stale = 0
            else:
                stale += 1
                if tc.patience is not None and stale > tc.patience:
                    bar.write(f"early stopping: no val-loss improvement for {stale} epochs")
                    break
        if step >= total_steps:
            break
    bar.close()
    if best["state"] is not None:  # keep the best checkpoint, not the last
        raw.load_state_dict(best["state"], strict=False)
    if accelerator.is_main_process:
        write_jsonl(run_dir / "train_log.jsonl", log)
    return {
        "train_steps": step,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "last_train_loss": last_loss,
        "best_val_loss": None if best["state"] is None else best["val_loss"],
        "best_epoch": best["epoch"],
        "lr": lr,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _validate(cfg, model, loaded, task, fmt, val, val_examples, step, epoch) -> dict:
    """Val loss and the task metric; generation tasks are scored on at most 32 val items to keep epochs cheap."""
    row = {"step": step, "epoch": epoch, "val_loss": mean_loss(model, loaded.kind, val, fmt.tokenizer.pad_token_id)}
    n = len(val) if task.kind == "classification" else min(len(val), 32)
    metrics, _ = evaluate(model, fmt, task, val_examples[:n], val[:n], split="val", progress=False)
    row[f"val_{task.primary_metric}"] = metrics[task.primary_metric]
    model.train()
    return row


def save_trained(model, loaded: LoadedModel, method: str, run_dir: Path) -> int:
    """Save the adapter (a standard peft folder) or, for full fine-tuning, the model folder; returns bytes on disk."""
    out = run_dir / "adapter" if method != "full" else run_dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    if method == "full":
        loaded.tokenizer.save_pretrained(out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def run_training(cfg: RunConfig) -> Path:
    """Train (or, for zero/few-shot, only evaluate) one method and write its run folder."""
    from accelerate import Accelerator

    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    method = get_method(cfg.method.name)
    task = get_task(cfg.data.task)
    splits = load_splits(cfg, task)
    run_dir = cfg.run_dir
    accelerator = Accelerator(
        cpu=cfg.model.device == "cpu", log_with=cfg.train.report_to or None, project_dir=str(run_dir)
    )
    loaded = load_model(
        cfg.model.name,
        device=str(accelerator.device) if cfg.model.device == "auto" else cfg.model.device,
        chat=cfg.model.chat,
        allow_pickle=cfg.model.allow_pickle,
    )
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    shots_k = cfg.data.shots or (3 if method.name == "few-shot" else 0)
    shots = few_shot_demos(task, splits["train"], shots_k, cfg.data.seed, cfg.data.template)
    from peftlab.distill import resolve_targets  # teacher outputs replace gold labels when configured

    train_examples = resolve_targets(cfg, task, splits["train"])
    enc = {
        "train": encode_split(cfg, task, fmt, train_examples),
        "val": encode_split(cfg, task, fmt, splits["val"], shots),
        "test": encode_split(cfg, task, fmt, splits["test"], shots),
    }
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if cfg.train.report_to:
            accelerator.init_trackers(cfg.name)
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
        summary = fit(cfg, model, loaded, task, fmt, enc["train"], enc["val"], splits["val"], run_dir, accelerator)
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
    for split in ("val", "test"):
        if not enc[split]:
            continue
        m, r = evaluate(model, fmt, task, splits[split], enc[split], split=split)
        metrics.update({f"{split}_{k}": v for k, v in m.items() if k not in ("task", "split")})
        if split == "test":
            rows = r
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
        "wall_seconds": time.perf_counter() - started,
        "truncated_examples": truncated,
        "metrics": metrics,
        "versions": _versions(),
    }
    write_json(run_dir / "result.json", result)  # written last: its presence marks the run complete


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {
        "peftlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
    }
