"""The measured sides of `peftlab bench train`, each run in its own process so peak memory is per side.

    python -m peftlab.bench.workers ROLE SPEC.json OUT.json

Roles: `ref` (transformers Trainer + peft, written the way a user would), `trl` (TRL's SFTTrainer, padding-free
with completion-only loss: what today's users pick over a hand-written Trainer), `peftlab` (peftlab's own `fit`
loop), `check` (five optimizer steps of peftlab's loss on a reference's first five batches) and `infer` (one no-grad
forward of the largest batch). SPEC holds the model, method, hyper-parameters, the autocast (`no` or `bf16`: bf16
autocast over fp32 weights, on every side alike) and the token ids, encoded once by the parent, so every side sees
identical ids.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftlab.core.resources import peak_rss_mb
from peftlab.models.forward import IGNORE
from peftlab.prompts.format import Encoded

CHECK_STEPS = 5


def peak_mb(spec: dict) -> float:
    """The side's peak memory: allocated GPU memory on CUDA (what limits a GPU run), else the process's RSS."""
    if spec.get("device", "cpu").startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _on_cpu(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cpu"


def _bf16(spec: dict) -> bool:
    """bf16 autocast over the fp32 weights: the Trainer's and TRL's `bf16=True`, peftlab's `train.mixed_precision`."""
    return spec.get("autocast", "no") == "bf16"


def _items(spec: dict) -> list[Encoded]:
    return [Encoded(str(i), p, t) for i, (p, t) in enumerate(spec["items"])]


def _trainable_checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the initial trainable weights: both sides must start from the same adapter init."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters() if p.requires_grad))


def load(spec: dict):
    """peftlab's model load on the spec's device and dtype (fp32 on the CPU by default)."""
    from peftlab.models.device import DTYPES
    from peftlab.models.loading import load_model

    loaded = load_model(spec["model"], device=spec.get("device", "cpu"), dtype=DTYPES[spec.get("dtype", "float32")])
    quantizer = getattr(loaded.model, "hf_quantizer", None)
    if quantizer is not None:
        # The converted packaged model still carries its GGUF marker although its weights are plain fp32, and
        # transformers.Trainer refuses to train a "GGUF-quantized" model.
        quantizer.remove_quantization_config(loaded.model)
    return loaded


def _reference_model(spec: dict, loaded):
    """The model as a user builds it with peft; same seed before get_peft_model as peftlab's apply_method."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(spec["seed"])
    if spec["method"] == "full":
        return loaded.model
    if spec["method"] == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                            task_type=TaskType.CAUSAL_LM)
    else:
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
    return get_peft_model(loaded.model, config)


class _RecordingDataset(torch.utils.data.Dataset):
    """Plain rows for the Trainer; remembers the order rows are read in, to recover the batches it trained on."""

    def __init__(self, items: list[Encoded]):
        self.items, self.seen = items, []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        self.seen.append(int(i))
        e = self.items[i]
        ids = e.prompt_ids + e.target_ids
        labels = [IGNORE] * len(e.prompt_ids) + e.target_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def run_ref(spec: dict) -> dict:
    """transformers.Trainer on the same rows and hyper-parameters; times trainer.train() wall-clock."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    loaded = load(spec)
    model = _reference_model(spec, loaded)
    dataset = _RecordingDataset(_items(spec))
    pad_collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding=True, label_pad_token_id=IGNORE)
    sizes: list[int] = []

    def collator(features):
        sizes.append(len(features))
        return pad_collator(features)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, **_trainer_args(spec))
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          processing_class=loaded.tokenizer)
        checksum = _trainable_checksum(model)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    batches, start = [], 0
    for size in sizes[:CHECK_STEPS]:
        batches.append(dataset.seen[start : start + size])
        start += size
    return {"seconds": seconds, "losses": _logged_losses(trainer), "batches": batches, "init_checksum": checksum,
            "rows_read": len(dataset.seen), "peak_mb": peak_mb(spec)}


def _trainer_args(spec: dict) -> dict:
    """The arguments the Trainer and TRL's SFTTrainer share (bench/README.md writes them out)."""
    return dict(
        per_device_train_batch_size=spec["batch"], num_train_epochs=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=_on_cpu(spec), seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True, bf16=_bf16(spec),
    )


def _logged_losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row][:CHECK_STEPS]


def _trl_dataset(items: list[Encoded]):
    """The same ids as a tokenized prompt-completion dataset: TRL builds its labels from `completion_mask`."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.prompt_ids + e.target_ids for e in items],
        "completion_mask": [[0] * len(e.prompt_ids) + [1] * len(e.target_ids) for e in items],
    })


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer, padding-free (each batch one row, attention kept inside each dialogue by the position ids),
    completion-only loss, the Trainer's hyper-parameters; times trainer.train() wall-clock.

    Prompt tuning trains padded: peft drops `position_ids` for prompt tuning (with a warning), and without them a
    padding-free row would let every dialogue attend to the ones before it.
    """
    from trl import SFTConfig, SFTTrainer

    loaded = load(spec)
    model = _reference_model(spec, loaded)
    items = _items(spec)
    padding_free = spec["method"] != "prompt-tuning"
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, padding_free=padding_free, completion_only_loss=True, max_length=None,
                         **_trainer_args(spec))
        trainer = SFTTrainer(model=model, args=args, train_dataset=_trl_dataset(items),
                             processing_class=loaded.tokenizer)
        # Which rows each batch held, for the math check: the collator sees the rows' ids (TRL's own collator is
        # required with padding_free, so it is wrapped after construction, not replaced).
        row_of = {tuple(e.prompt_ids + e.target_ids): i for i, e in reversed(list(enumerate(items)))}
        collate, batches = trainer.data_collator, []

        def recording(features):
            batches.append([row_of[tuple(f["input_ids"])] for f in features])
            return collate(features)

        trainer.data_collator = recording
        checksum = _trainable_checksum(model)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "losses": _logged_losses(trainer), "batches": batches[:CHECK_STEPS],
            "init_checksum": checksum, "rows_read": sum(map(len, batches)), "padding_free": padding_free,
            "peak_mb": peak_mb(spec)}


def _peftlab_model(spec: dict):
    """(config, method, loaded base, task, model to train, base parameters) for one spec."""
    from peftlab.core.config import load_config
    from peftlab.data.tasks import get_task
    from peftlab.kernels.memory import enable_checkpointing, fused_rmsnorm, lean_swiglu
    from peftlab.methods.registry import apply_method, get_method

    cfg = load_config(None, base={
        "model": {"name": spec["model"], "device": spec.get("device", "cpu"), "dtype": spec.get("dtype", "float32")},
        "method": {"name": spec["method"], "dropout": 0.0},
        "train": {"lr": spec["lr"], "schedule": "constant", "warmup_ratio": 0.0, "batch_size": spec["batch"],
                  "batch_tokens": spec["batch"] * spec["max_length"], "epochs": 1, "eval_every_epoch": False,
                  "seed": spec["seed"], "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "mixed_precision": spec.get("autocast", "no"), **spec.get("train", {})},
    })
    method = get_method(cfg.method.name)
    loaded = load(spec)
    base_params = loaded.num_params
    task = get_task("dialogsum")
    torch.manual_seed(spec["seed"])  # the same seed the reference uses before get_peft_model
    enable_checkpointing(loaded.model, cfg.train.activation_checkpointing)
    lean_swiglu(loaded.model)
    fused_rmsnorm(loaded.model)
    return cfg, method, loaded, task, apply_method(method, loaded, task, cfg.method), base_params


def run_peftlab(spec: dict) -> dict:
    """peftlab's real training loop (`train.loop.fit`), one epoch; times the fit() call wall-clock."""
    from accelerate import Accelerator

    from peftlab.prompts.format import PromptFormat
    from peftlab.train.loop import FitData, fit

    cfg, method, loaded, task, model, base_params = _peftlab_model(spec)
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = FitData(task, fmt, _items(spec), [], [], method)
        summary = fit(cfg, model, loaded, data, Path(tmp), Accelerator(cpu=_on_cpu(spec)))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "step_seconds": summary["train_seconds"], "steps": summary["train_steps"],
            "base_params": base_params, "peak_mb": peak_mb(spec)}


def run_check(spec: dict) -> dict:
    """Five AdamW steps of peftlab's own `train_step` (its batch layout, pieces and shared prefix) on exactly the
    reference's first five batches."""
    from accelerate import Accelerator

    from peftlab.prompts.batches import right_padded_ok
    from peftlab.train.step import micro_tokens, shares_prefix, split_rows, step_inputs, train_step

    cfg, _, loaded, _, model, _ = _peftlab_model(spec)
    items = _items(spec)
    right = right_padded_ok(model, loaded.kind, items)  # the layout peftlab's own loop trains with
    share = shares_prefix(cfg, right, device=spec.get("device", "cpu"))
    checksum = _trainable_checksum(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, as the reference's
    accelerator = Accelerator(cpu=_on_cpu(spec))
    model.train()
    losses = []
    for idx in spec["batches"]:
        pieces = split_rows(items, idx, micro_tokens(cfg.train.micro_tokens, accelerator.device))
        micro, prefix_ids = step_inputs(items, pieces, loaded.kind, loaded.tokenizer.pad_token_id, right, share)
        losses.append(train_step(model, micro, loaded.kind, accelerator, params, optimizer, scheduler, 1.0,
                                 prefix_ids, torch.bfloat16 if _bf16(spec) else None))
    return {"losses": losses, "init_checksum": checksum}


@torch.inference_mode()
def run_infer(spec: dict) -> dict:
    """Peak memory of serving the same data: one forward of the `batch` longest examples."""
    from peftlab.models.forward import target_logits
    from peftlab.prompts.batches import collate
    loaded = load(spec)
    longest = sorted(_items(spec), key=lambda e: e.length)[-spec["batch"] :]
    batch = collate(longest, loaded.kind, loaded.tokenizer.pad_token_id)
    target_logits(loaded.model.eval(), loaded.kind, {k: v.to(loaded.model.device) for k, v in batch.items()})
    return {"peak_mb": peak_mb(spec)}


ROLES = {"ref": run_ref, "trl": run_trl, "peftlab": run_peftlab, "check": run_check, "infer": run_infer}


def main(argv: list[str]) -> None:
    role, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(ROLES[role](spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
