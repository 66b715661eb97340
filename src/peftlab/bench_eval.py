"""`peftlab bench eval`: generation and scoring speed of peftlab's evaluator against the loop a user writes.

Greedy summaries of the first n DialogSum dialogues, (1) one `model.generate` call per dialogue and (2)
`peftlab.evaluate.generate` (length-sorted, left-padded batches with the KV cache); the outputs must be identical.
llama.cpp on the packaged GGUF is timed too when llama-cpp-python is installed. Classification is timed as
label-word scoring of PubMedQA items.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from peftlab.bench import append_results, data_file, encode_dialogsum, machine_line, tiny_model

TARGET_SPEEDUP = 5.0


@torch.inference_mode()
def one_at_a_time(model, fmt, items, max_new_tokens: int) -> list[str]:
    """The baseline: a plain loop of `model.generate`, one unpadded prompt per call."""
    tok = fmt.tokenizer
    outputs = []
    for e in items:
        input_ids = torch.tensor([e.prompt_ids])
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


def llama_cpp_seconds(model: str, fmt, items, max_new_tokens: int) -> float | None:
    """Seconds per dialogue for llama.cpp on the packaged GGUF (same chat prompts, one at a time), if installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from peftlab.models import PACKAGED

    if model not in PACKAGED:
        return None
    llm = Llama(model_path=str(PACKAGED[model].locate_gguf()), n_threads=os.cpu_count(), n_ctx=2048, verbose=False)
    t0 = time.perf_counter()
    for e in items:
        llm.create_completion(prompt=fmt.tokenizer.decode(e.prompt_ids), max_tokens=max_new_tokens,
                              temperature=0.0, stop=[fmt.end_of_turn])
    return (time.perf_counter() - t0) / len(items)


def scoring_items_per_s(loaded, fmt, n: int) -> tuple[float, int]:
    """Items per second of label-word scoring on the first n PubMedQA items."""
    from peftlab.data import encode
    from peftlab.evaluate import label_scores
    from peftlab.tasks import get_task

    task = get_task("pubmedqa")
    items = [encode(task, ex, fmt, 512) for ex in task.load(data_file("pubmedqa"))[:n]]
    t0 = time.perf_counter()
    label_scores(loaded.model, fmt, items, task.labels, progress=False)
    return len(items) / (time.perf_counter() - t0), len(items)


def compare_generation(loaded, fmt, items, max_new_tokens: int) -> dict:
    """Time both generation paths on the same prompts and count the dialogues whose outputs differ."""
    from peftlab.evaluate import generate

    t0 = time.perf_counter()
    baseline = one_at_a_time(loaded.model, fmt, items, max_new_tokens)
    t1 = time.perf_counter()
    batched = generate(loaded.model, fmt, items, max_new_tokens, progress=False)
    t2 = time.perf_counter()
    mismatches = [
        {"id": e.id, "one_at_a_time": a, "peftlab": b}
        for e, a, b in zip(items, baseline, batched, strict=True) if a != b
    ]
    return {"baseline_s": (t1 - t0) / len(items), "peftlab_s": (t2 - t1) / len(items),
            "speedup": (t1 - t0) / (t2 - t1), "mismatches": mismatches}


def eval_table(r: dict, n: int) -> str:
    llama = "llama-cpp-python not installed: skipped" if r["llama_cpp_s"] is None else f"{r['llama_cpp_s']:.3f}"
    rows = [
        ("one-at-a-time model.generate, s/dialogue", f"{r['baseline_s']:.3f}"),
        ("peftlab.evaluate.generate, s/dialogue", f"{r['peftlab_s']:.3f}"),
        (f"speedup (target >= {TARGET_SPEEDUP:g}x)", f"{r['speedup']:.2f}x"),
        ("outputs differing from one-at-a-time", f"{len(r['mismatches'])} of {n}"),
        ("llama.cpp (packaged GGUF), s/dialogue", llama),
        (f"PubMedQA label scoring ({r['scored']} items), items/s", f"{r['scoring_items_s']:.1f}"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def run_eval_bench(
    model: str, n: int, max_new_tokens: int, results: Path | None, smoke: bool = False, json_out: Path | None = None,
    score_n: int = 100,
) -> dict:
    """Run the evaluation benchmark; print the table, append it to `results` (if given) and return the numbers."""
    from peftlab.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        name = str(tiny_model(Path(tmp) / "tiny-llama")) if smoke else model
        fmt, items, _ = encode_dialogsum(name, n, 1024)
        loaded = load_model(name, device="cpu", dtype=torch.float32)
        loaded.model.eval()
        r = compare_generation(loaded, fmt, items, max_new_tokens)
        r["llama_cpp_s"] = None if smoke else llama_cpp_seconds(model, fmt, items, max_new_tokens)
        r["scoring_items_s"], r["scored"] = scoring_items_per_s(loaded, fmt, score_n)
    print(machine_line())
    table = eval_table(r, n)
    print(table)
    for m in r["mismatches"]:
        print(f"mismatch {m['id']}:\n  one-at-a-time: {m['one_at_a_time']!r}\n  peftlab:       {m['peftlab']!r}")
    if results is not None:
        label = "tiny random model" if smoke else Path(model).name
        title = f"Evaluation speed: {label}, n={n}, max_new_tokens={max_new_tokens}"
        append_results(results, title, table)
        print(f"appended to {results}")
    if json_out is not None:
        json_out.write_text(json.dumps(r))
    return r
