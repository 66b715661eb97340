"""A run's result in the JSON shape of peft's `method_comparison/` results, so it can sit beside peft's published runs.

peft writes `{"run_info", "train_info", "meta_info"}` per experiment (method_comparison/MetaMathQA/results/*.json).
This file is built only from the run folder's own files (config.yaml, result.json, train_log.jsonl,
adapter/adapter_config.json); peftlab's `result.json` stays as it is. Fields peft has and peftlab does not measure
(GPU memory averages, dataset hashes) are null; peftlab-only numbers go under `train_info.peftlab`.

    run_info:   created_at, total_time (wall s), experiment_name ("<method>/<run>"), peft_branch (null),
                train_config (the run's config.yaml: model, data, method, train), peft_config (adapter_config.json
                or null for zero-shot, linear head and full fine-tuning), error_msg
    train_info: accelerator_memory_max (peak GPU bytes, null on CPU), cpu_memory_max (peak RSS bytes),
                train_time, file_size (adapter bytes), num_trainable_params, num_total_params, status,
                metrics (one entry per logged val epoch: step, "valid <metric>", "train loss", "tokens / sec";
                then the final entry with "test <metric>" for every scalar test metric), peftlab (tokens/s, lr, ...)
    meta_info:  model_info {name}, dataset_info {task, train_mix}, package_info (library versions as
                "<name>-version"), system_info (platform: system, release, machine, processor)
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

from peftlab.core.files import write_json
from peftlab.core.result import read_result
from peftlab.core.yamlio import read_yaml
from peftlab.report.study_runs import read_jsonl

PEFT_RESULT = "peft_result.json"


def _train_metrics(log: list[dict], result: dict) -> list[dict]:
    """peft's per-eval entries (from the val lines of train_log.jsonl) and a last entry with the test metrics."""
    entries, last_loss, speed = [], None, None
    for row in log:
        if "loss" in row:
            last_loss, speed = row["loss"], row.get("tokens_per_s")
            continue
        vals = {f"valid {k.removeprefix('val_')}": v for k, v in row.items() if k.startswith("val_")}
        if vals:
            entries.append({"step": row.get("step"), **vals, "train loss": last_loss, "tokens / sec": speed})
    metrics = result.get("metrics") or {}
    test = {f"test {k.removeprefix('test_')}": v for k, v in metrics.items()
            if k.startswith("test_") and isinstance(v, int | float) and not isinstance(v, bool)}
    entries.append({"step": result.get("train_steps"), **test, "train loss": result.get("last_train_loss")})
    return entries


def peft_result(run_dir: Path) -> dict:
    """The run folder's result as peft's method_comparison JSON."""
    run_dir = Path(run_dir)
    result = read_result(run_dir).to_dict()
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    adapter_cfg = run_dir / "adapter" / "adapter_config.json"
    log = read_jsonl(run_dir / "train_log.jsonl")
    speed = next((r.get("tokens_per_s") for r in reversed(log) if "tokens_per_s" in r), None)
    finished = datetime.fromtimestamp((run_dir / "result.json").stat().st_mtime, UTC)
    gpu = result.get("peak_gpu_mb")
    return {
        "run_info": {
            "created_at": finished.isoformat(timespec="seconds"),
            "total_time": result.get("wall_seconds"),
            "experiment_name": f"{result.get('method')}/{result.get('name')}",
            "peft_branch": None,
            "train_config": config,
            "peft_config": json.loads(adapter_cfg.read_text()) if adapter_cfg.is_file() else None,
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_max": gpu * 2**20 if isinstance(gpu, int | float) else None,
            "cpu_memory_max": (result.get("peak_rss_mb") or 0) * 2**20,
            "train_time": result.get("train_seconds"),
            "file_size": result.get("adapter_bytes"),
            "num_trainable_params": result.get("trainable_params"),
            "num_total_params": result.get("total_params"),
            "status": "success",
            "metrics": _train_metrics(log, result),
            "peftlab": {"tokens_per_s": result.get("tokens_per_s") or speed, "lr": result.get("lr"),
                        "best_epoch": result.get("best_epoch"), "primary_metric": result.get("primary_metric")},
        },
        "meta_info": {
            "model_info": {"name": result.get("model")},
            "dataset_info": {"task": result.get("task"), "train_mix": result.get("train_mix")},
            "package_info": {f"{k}-version": v for k, v in (result.get("versions") or {}).items()},
            "system_info": {"system": platform.system(), "release": platform.release(),
                            "machine": platform.machine(), "processor": platform.processor()},
        },
    }


def write_peft_result(run_dir: Path) -> Path:
    """Write `<run>/peft_result.json`; returns its path."""
    path = Path(run_dir) / PEFT_RESULT
    write_json(path, peft_result(run_dir))
    return path
