"""Check that every trained run of a classification study reloads with plain transformers + peft and reproduces
peftlab's test predictions.

    python scripts/verify_adapters.py runs/pubmedqa-compare

Nothing of peftlab's model code is used to score: the base comes from `AutoModelForCausalLM.from_pretrained`, the
adapter from `PeftModel.from_pretrained`, and each saved prompt is scored alone (no padding) by the likelihood of
each label's first token, as peftlab does. Prints one line per run, with its peft tuner, and exits non-zero on any
disagreement.

Any peft tuner works: the LoRA family, VeRA, LoHa, LoKr, OFT, BOFT, HRA, FourierFT, MiSS, SHiRA, HiRA, LN-tuning,
AdaLoRA (saved pruned to its final ranks) and PiSSA/OLoRA (saved converted to the LoRA that fits the untouched
base). Lily is the exception by design: its router averages over every token of a batch, so a prompt scored alone
can differ slightly from the same prompt scored in peftlab's batch (docs/methods.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.core.yamlio import read_yaml
from peftlab.models.packaged import resolve_model_dir


def _load(run: Path):
    config = read_yaml(run / "config.yaml")
    if (run / "model").is_dir():  # full fine-tuning saves the whole model
        return AutoModelForCausalLM.from_pretrained(run / "model"), AutoTokenizer.from_pretrained(run / "model")
    base_dir = resolve_model_dir(config["model"]["name"])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, run / "adapter"), AutoTokenizer.from_pretrained(base_dir)


@torch.inference_mode()
def verify(run: Path) -> tuple[int, int]:
    """(agreeing, total) test predictions for one run."""
    model, tokenizer = _load(run)
    model.eval()
    result = json.loads((run / "result.json").read_text())
    labels = result["metrics"]["test_labels"]
    first = [tokenizer(label, add_special_tokens=False).input_ids[0] for label in labels]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    agree = 0
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        agree += labels[int(logits[first].argmax())] == row["prediction"]
    return agree, len(rows)


def main(study: Path) -> int:
    failures = 0
    for run in sorted(p for p in study.iterdir() if (p / "adapter").is_dir() or (p / "model").is_dir()):
        agree, total = verify(run)
        failures += agree != total
        config = run / "adapter" / "adapter_config.json"
        kind = json.loads(config.read_text())["peft_type"] if config.exists() else "full model"
        print(f"{run.name} ({kind}): {agree}/{total} test predictions reproduced with plain transformers + peft")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
