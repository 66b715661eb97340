"""`peftlab bench eval`: generation and scoring speed of peftlab's evaluator against the loop a user writes.

Greedy summaries of the first n DialogSum dialogues, (1) one `model.generate` call per dialogue, (2) batched
`model.generate` on left-padded batches with a static KV cache (what the transformers docs recommend) and (3)
`peftlab.evaluate.generate` (length-sorted batches with its own KV cache); the outputs must be identical at fp32.
llama.cpp on the packaged GGUF is timed too when llama-cpp-python is installed. Classification is timed as
label-word scoring of PubMedQA items, in fp32 and, on a CPU with native bf16, under bf16 autocast.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.bench.common import (
    append_results,
    check_dtype,
    data_file,
    encode_dialogsum,
    machine_line,
    native_bf16_cpu,
    tiny_model,
)

TARGET_SPEEDUP = 5.0
TARGET_BATCHED = 2.0  # peftlab against batched model.generate with a static cache
GENERATE_BATCH = 16


@torch.inference_mode()
def one_at_a_time(model, fmt, items, max_new_tokens: int) -> list[str]:
    """The baseline: a plain loop of `model.generate`, one unpadded prompt per call."""
    tok = fmt.tokenizer
    outputs = []
    for e in items:
        input_ids = torch.tensor([e.prompt_ids], device=model.device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=fmt.stop_token_ids,
            pad_token_id=tok.pad_token_id,
        )
        outputs.append(tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


@torch.inference_mode()
def batched_generate(model, fmt, items, max_new_tokens: int, batch: int = GENERATE_BATCH) -> list[str]:
    """The stronger baseline: `model.generate` on left-padded batches of `batch` prompts with a static KV cache.

    What the transformers docs recommend for batched greedy decoding: the tokenizer pads on the left, so every row's
    next token sits in the last column, and `cache_implementation="static"` preallocates the cache once per call.
    Prompts go in length order (less padding; a user sorting by length is a one-liner); outputs in `items`' order.
    """
    tok = fmt.tokenizer
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))
    outputs = [""] * len(items)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        padded = tok.pad({"input_ids": [items[i].prompt_ids for i in idx]}, padding_side="left", return_tensors="pt")
        out = model.generate(
            input_ids=padded["input_ids"].to(model.device), attention_mask=padded["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, cache_implementation="static",
            eos_token_id=fmt.stop_token_ids, pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(idx):
            outputs[i] = tok.decode(out[row, padded["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return outputs


def llama_cpp_seconds(model: str, fmt, items, max_new_tokens: int) -> float | None:
    """Seconds per dialogue for llama.cpp on the packaged GGUF (same chat prompts, one at a time), if installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from peftlab.models.packaged import PACKAGED

    if model not in PACKAGED:
        return None
    llm = Llama(model_path=str(PACKAGED[model].locate_gguf()), n_threads=os.cpu_count(), n_ctx=2048, verbose=False)
    t0 = time.perf_counter()
    for e in items:
        llm.create_completion(prompt=fmt.tokenizer.decode(e.prompt_ids), max_tokens=max_new_tokens,
                              temperature=0.0, stop=[fmt.end_of_turn])
    return (time.perf_counter() - t0) / len(items)


def scoring(loaded, fmt, n: int, bf16: bool) -> dict:
    """Label-word scoring of the first n PubMedQA items in fp32 and, if `bf16`, under bf16 autocast over the fp32
    weights: items/s of each, the accuracy of each, and how many predictions bf16 changes."""
    from peftlab.data.tasks import get_task
    from peftlab.evaluate.scoring import label_scores
    from peftlab.prompts.encoding import encode

    task = get_task("pubmedqa")
    examples = task.load(data_file("pubmedqa"))[:n]
    items = [encode(task, ex, fmt, 512) for ex in examples]
    truth = torch.tensor([task.labels.index(ex.target) for ex in examples])
    result = {"scored": len(items)}
    for name in ("fp32", "bf16") if bf16 else ("fp32",):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else nullcontext()
        with autocast:
            # untimed warm-up, so neither precision pays the other's first-call costs (fresh pages, kernel choices)
            label_scores(loaded.model, fmt, items[:8], task.labels, progress=False)
            t0 = time.perf_counter()
            scores = label_scores(loaded.model, fmt, items, task.labels, progress=False)
        result[f"{name}_items_s"] = len(items) / (time.perf_counter() - t0)
        result[f"{name}_accuracy"] = float((scores.argmax(-1) == truth).float().mean())
        result[f"{name}_predictions"] = scores.argmax(-1).tolist()
    if bf16:
        result["bf16_changed"] = sum(a != b for a, b in zip(result["fp32_predictions"], result["bf16_predictions"],
                                                            strict=True))
    result["scoring_items_s"] = result["fp32_items_s"]  # the name earlier JSON readers use
    return result


def compare_generation(loaded, fmt, items, max_new_tokens: int, rounds: int = 4, batch: int = GENERATE_BATCH) -> dict:
    """Time the three generation paths on the same prompts, interleaved; count the outputs that differ.

    This machine's speed drifts by up to 10-20% over minutes, and the sides take very different times (the loop
    about 150 s, peftlab about 30 s), so timing them back to back lets the drift decide the ratios. Instead the
    dialogues are cut into `rounds` consecutive blocks: each block goes through the loop, then through batched
    `model.generate` (`batch` rows a call), and after each block peftlab generates all of them. Every side is
    sampled across the same minutes. peftlab's time is the mean of its rounds; the baselines' times are the sums of
    their blocks. Every round's outputs, peftlab's and the batched baseline's, are compared with the loop's.
    """
    from peftlab.evaluate.generation import generate

    bounds = [round(len(items) * i / rounds) for i in range(rounds + 1)]
    baseline: list[str] = []
    batched: list[str] = []
    baseline_s, batched_s, rounds_s, runs = 0.0, 0.0, [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        t0 = time.perf_counter()
        baseline += one_at_a_time(loaded.model, fmt, items[a:b], max_new_tokens)
        t1 = time.perf_counter()
        if batch > 0:
            batched += batched_generate(loaded.model, fmt, items[a:b], max_new_tokens, batch)
        t2 = time.perf_counter()
        runs.append(generate(loaded.model, fmt, items, max_new_tokens, progress=False))
        rounds_s.append(time.perf_counter() - t2)
        baseline_s, batched_s = baseline_s + t1 - t0, batched_s + t2 - t1
    peftlab_s = sum(rounds_s) / len(rounds_s)
    mismatches = [
        {"id": e.id, "round": r, "one_at_a_time": a, "peftlab": out[i]}
        for r, out in enumerate(runs) for i, (e, a) in enumerate(zip(items, baseline, strict=True))
        if a != out[i]
    ]
    result = {"baseline_s": baseline_s / len(items), "peftlab_s": peftlab_s / len(items),
              "peftlab_rounds_s": [t / len(items) for t in rounds_s], "speedup": baseline_s / peftlab_s,
              "mismatches": mismatches, "batched_s": None, "batched_mismatches": []}
    if batch > 0:
        result.update(batched_s=batched_s / len(items), batched_speedup=batched_s / peftlab_s, generate_batch=batch,
                      batched_mismatches=[{"id": e.id, "one_at_a_time": a, "batched": o}
                                          for e, a, o in zip(items, baseline, batched, strict=True) if a != o])
    return result


def eval_table(r: dict, n: int) -> str:
    if r["llama_cpp_s"] is not None:
        llama = f"{r['llama_cpp_s']:.3f}"
    elif r.get("device", "cpu") != "cpu":
        llama = "not timed: llama.cpp runs on the CPU"
    else:
        llama = "llama-cpp-python not installed: skipped"
    rows = [
        ("one-at-a-time model.generate, s/dialogue", f"{r['baseline_s']:.3f}"),
        (f"peftlab.evaluate.generation.generate, s/dialogue (mean of {len(r['peftlab_rounds_s'])} rounds)",
         f"{r['peftlab_s']:.3f} ({' '.join(f'{t:.3f}' for t in r['peftlab_rounds_s'])})"),
        (f"speedup (target >= {TARGET_SPEEDUP:g}x)", f"{r['speedup']:.2f}x"),
        ("outputs differing from one-at-a-time (all rounds)",
         f"{len(r['mismatches'])} of {n * len(r['peftlab_rounds_s'])}"),
    ]
    if r.get("batched_s") is not None:
        rows += [
            (f"batched model.generate ({r['generate_batch']} rows, left-padded, static cache), s/dialogue",
             f"{r['batched_s']:.3f}"),
            (f"peftlab against batched generate (target >= {TARGET_BATCHED:g}x)", f"{r['batched_speedup']:.2f}x"),
            ("batched generate outputs differing from one-at-a-time", f"{len(r['batched_mismatches'])} of {n}"),
        ]
    rows += [("llama.cpp (packaged GGUF), s/dialogue", llama),
             (f"PubMedQA label scoring ({r['scored']} items), items/s", f"{r['scoring_items_s']:.1f}")]
    if "bf16_items_s" in r:
        rows += [
            ("PubMedQA label scoring under bf16 autocast, items/s (speedup)",
             f"{r['bf16_items_s']:.1f} ({r['bf16_items_s'] / r['fp32_items_s']:.2f}x)"),
            ("PubMedQA accuracy fp32 / bf16; predictions bf16 changes",
             f"{r['fp32_accuracy']:.3f} / {r['bf16_accuracy']:.3f}; {r['bf16_changed']} of {r['scored']}"),
        ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


@dataclass(frozen=True, kw_only=True)
class EvalBenchOptions:
    """What `peftlab bench eval` was given. Keyword-only, like `TrainBenchOptions`: eleven options in a row are too
    easy to swap."""

    model: str  # packaged model name or local HF folder (replaced by the tiny random model under `smoke`)
    n: int  # DialogSum dialogues generated for
    max_new_tokens: int
    results: Path | None  # markdown file to append to; None: print only
    smoke: bool = False
    json_out: Path | None = None
    score_n: int = 100  # PubMedQA items for the label-scoring timing
    rounds: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    generate_batch: int = GENERATE_BATCH  # rows of batched model.generate; 0 skips it


def run_eval_bench(opts: EvalBenchOptions) -> dict:
    """Run the evaluation benchmark; print the table, append it to `opts.results` (if given) and return the
    numbers."""
    from peftlab.models.device import DTYPES
    from peftlab.models.loading import load_model

    check_dtype(opts.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        name = str(tiny_model(Path(tmp) / "tiny-llama")) if opts.smoke else opts.model
        fmt, items, _ = encode_dialogsum(name, opts.n, 1024)
        loaded = load_model(name, device=opts.device, dtype=DTYPES[opts.dtype])
        loaded.model.eval()
        r = compare_generation(loaded, fmt, items, opts.max_new_tokens, opts.rounds, opts.generate_batch)
        # llama.cpp runs on the CPU: timed only next to a CPU run, where the comparison means something.
        r["device"], r["dtype"] = opts.device, opts.dtype
        r["llama_cpp_s"] = (None if opts.smoke or opts.device != "cpu"
                            else llama_cpp_seconds(opts.model, fmt, items, opts.max_new_tokens))
        # bf16 autocast scoring is timed where the CPU computes bf16 natively (fp32 weights: `dtype` float32)
        bf16 = opts.device == "cpu" and opts.dtype == "float32" and native_bf16_cpu()
        r.update(scoring(loaded, fmt, opts.score_n, bf16))
    report_eval(r, opts)
    return r


def report_eval(r: dict, opts: EvalBenchOptions) -> None:
    """Print the table and every output that differs; append to the results file and write the JSON if asked."""
    print(machine_line(opts.device))
    table = eval_table(r, opts.n)
    print(table)
    for m in r["mismatches"]:
        print(f"mismatch {m['id']} (round {m['round']}):\n  one-at-a-time: {m['one_at_a_time']!r}\n"
              f"  peftlab:       {m['peftlab']!r}")
    for m in r["batched_mismatches"]:
        print(f"batched generate mismatch {m['id']}:\n  one-at-a-time: {m['one_at_a_time']!r}\n"
              f"  batched:       {m['batched']!r}")
    if opts.results is not None:
        label = "tiny random model" if opts.smoke else Path(opts.model).name
        title = f"Evaluation speed: {label}, n={opts.n}, max_new_tokens={opts.max_new_tokens}"
        if opts.device != "cpu" or opts.dtype != "float32":
            title += f", {opts.device} {opts.dtype}"
        append_results(opts.results, title, table, opts.device)
        print(f"appended to {opts.results}")
    if opts.json_out is not None:
        opts.json_out.write_text(json.dumps(r))
