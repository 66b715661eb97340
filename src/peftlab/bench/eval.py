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

from peftlab.bench.train import append_results, check_dtype, data_file, encode_dialogsum, machine_line, tiny_model

TARGET_SPEEDUP = 5.0


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


def scoring_items_per_s(loaded, fmt, n: int) -> tuple[float, int]:
    """Items per second of label-word scoring on the first n PubMedQA items."""
    from peftlab.data.tasks import get_task
    from peftlab.evaluate.scoring import label_scores
    from peftlab.prompts.encoding import encode

    task = get_task("pubmedqa")
    items = [encode(task, ex, fmt, 512) for ex in task.load(data_file("pubmedqa"))[:n]]
    t0 = time.perf_counter()
    label_scores(loaded.model, fmt, items, task.labels, progress=False)
    return len(items) / (time.perf_counter() - t0), len(items)


def compare_generation(loaded, fmt, items, max_new_tokens: int, rounds: int = 4) -> dict:
    """Time both generation paths on the same prompts, interleaved; count the dialogues whose outputs differ.

    This machine's speed drifts by up to 10-20% over minutes, and the two sides take very different times (the loop
    about 150 s, peftlab about 30 s), so timing them back to back lets the drift decide the ratio. Instead the loop
    runs in `rounds` consecutive blocks of the dialogues, and after each block peftlab generates all of them: both
    sides are sampled across the same minutes. peftlab's time is the mean of its rounds; every round's outputs are
    compared with the loop's.
    """
    from peftlab.evaluate.generation import generate

    bounds = [round(len(items) * i / rounds) for i in range(rounds + 1)]
    baseline: list[str] = []
    baseline_s, rounds_s, runs = 0.0, [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        t0 = time.perf_counter()
        baseline += one_at_a_time(loaded.model, fmt, items[a:b], max_new_tokens)
        t1 = time.perf_counter()
        runs.append(generate(loaded.model, fmt, items, max_new_tokens, progress=False))
        rounds_s.append(time.perf_counter() - t1)
        baseline_s += t1 - t0
    peftlab_s = sum(rounds_s) / len(rounds_s)
    mismatches = [
        {"id": e.id, "round": r, "one_at_a_time": a, "peftlab": batched[i]}
        for r, batched in enumerate(runs) for i, (e, a) in enumerate(zip(items, baseline, strict=True))
        if a != batched[i]
    ]
    return {"baseline_s": baseline_s / len(items), "peftlab_s": peftlab_s / len(items),
            "peftlab_rounds_s": [t / len(items) for t in rounds_s], "speedup": baseline_s / peftlab_s,
            "mismatches": mismatches}


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
        ("llama.cpp (packaged GGUF), s/dialogue", llama),
        (f"PubMedQA label scoring ({r['scored']} items), items/s", f"{r['scoring_items_s']:.1f}"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def run_eval_bench(
    model: str, n: int, max_new_tokens: int, results: Path | None, smoke: bool = False, json_out: Path | None = None,
    score_n: int = 100, rounds: int = 4, device: str = "cpu", dtype: str = "float32",
) -> dict:
    """Run the evaluation benchmark; print the table, append it to `results` (if given) and return the numbers."""
    from peftlab.models.device import DTYPES
    from peftlab.models.loading import load_model

    check_dtype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        name = str(tiny_model(Path(tmp) / "tiny-llama")) if smoke else model
        fmt, items, _ = encode_dialogsum(name, n, 1024)
        loaded = load_model(name, device=device, dtype=DTYPES[dtype])
        loaded.model.eval()
        r = compare_generation(loaded, fmt, items, max_new_tokens, rounds)
        # llama.cpp runs on the CPU: timed only next to a CPU run, where the comparison means something.
        r["device"], r["dtype"] = device, dtype
        r["llama_cpp_s"] = None if smoke or device != "cpu" else llama_cpp_seconds(model, fmt, items, max_new_tokens)
        r["scoring_items_s"], r["scored"] = scoring_items_per_s(loaded, fmt, score_n)
    print(machine_line(device))
    table = eval_table(r, n)
    print(table)
    for m in r["mismatches"]:
        print(f"mismatch {m['id']} (round {m['round']}):\n  one-at-a-time: {m['one_at_a_time']!r}\n"
              f"  peftlab:       {m['peftlab']!r}")
    if results is not None:
        label = "tiny random model" if smoke else Path(model).name
        title = f"Evaluation speed: {label}, n={n}, max_new_tokens={max_new_tokens}"
        if device != "cpu" or dtype != "float32":
            title += f", {device} {dtype}"
        append_results(results, title, table, device)
        print(f"appended to {results}")
    if json_out is not None:
        json_out.write_text(json.dumps(r))
    return r
