"""`peftlab bench train`: training throughput of peftlab against the plain transformers Trainer + peft way.

Both sides train one epoch on the same token ids (the first n DialogSum dialogues, encoded once here) with the same
hyper-parameters, each in its own process (`peftlab.bench.workers`) so peak memory is per side. A math check runs
peftlab's loss for five steps on the reference's own first five batches: speed-ups must not change the losses.
How each side is built is written down in bench/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peftlab.bench.common import (
    append_results,
    check_dtype,
    encode_dialogsum,
    machine_line,
    native_bf16_cpu,
    tiny_model,
)
from peftlab.core.errors import PeftlabError

# The convention: a trained weight costs 6 FLOPs per token (forward, activation and weight gradients);
# a frozen one 4 (no weight gradient). N is the base model's parameter count.
FLOPS_PER_PARAM = {"full": 6, "lora": 4, "prompt-tuning": 4}
TARGET_RATIO = {"full": 2.0, "lora": 2.0, "prompt-tuning": 2.0}  # issue 34: >= 2x the Trainer for each
TARGET_SGEMM = {"lora": 0.6}
# Speed-ups must not change the math: at fp32 the losses agree to 1e-3 relative. In 16-bit dtypes two correct
# implementations round differently (the reference pads rows that peftlab does not), so the bar is the dtype's.
MAX_REL_DIFF = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}


def sgemm_gflops(device: str = "cpu", dtype: str = "float32", repeats: int = 5) -> float:
    """The device's matmul ceiling in the benchmark's dtype: best of a few torch.mm runs, after a warm-up.

    2048 squared saturates a CPU's cores; a GPU needs a larger product to reach its peak.
    """
    import torch

    from peftlab.models.device import DTYPES

    size = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def run_worker(role: str, spec: dict, tmp: Path) -> dict:
    """Run one side in a fresh Python process and return its JSON answer."""
    spec_file, out_file = tmp / f"{role}-spec.json", tmp / f"{role}-out.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "peftlab.bench.workers", role, str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeftlabError(f"bench worker '{role}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out_file.read_text())


# Each reference a worker role; `trl` is timed only where TRL is installed (pip install 'peftlab[bench]').
REFERENCES = {"trainer": "ref", "trl": "trl"}
TARGET_RATIO_TRL = 1.5
AUTOCASTS = ("no", "bf16")
# Where the CPU computes bf16 natively, the bf16 row is to be this much faster than peftlab's own fp32 row.
TARGET_BF16_SPEEDUP = 1.5


def check_autocasts(autocasts: list[str], device: str) -> None:
    """bf16 autocast is benchmarked over fp32 weights; a CPU without native bf16 emulates it and says so."""
    bad = [a for a in autocasts if a not in AUTOCASTS]
    if bad or not autocasts:
        raise PeftlabError(f"bench train: --autocast takes {', '.join(AUTOCASTS)} (comma-separated), got {autocasts}")
    if "bf16" in autocasts and device == "cpu" and not native_bf16_cpu():
        print("note: this CPU has no native bf16 (AVX512_BF16 or AMX): bf16 autocast runs emulated here")


def usable_references(references: list[str]) -> list[str]:
    """The references asked for that can run here; TRL skipped, with a note, where it is not installed."""
    import importlib.util

    unknown = [r for r in references if r not in REFERENCES]
    if unknown or "trainer" not in references:
        raise PeftlabError(f"bench train: --references must include trainer, from {sorted(REFERENCES)}; got "
                           f"{references}")
    if "trl" in references and importlib.util.find_spec("trl") is None:
        print("note: trl not installed (pip install 'peftlab[bench]'): the TRL reference is skipped")
        return [r for r in references if r != "trl"]
    return references


def timed_sides(spec: dict, tmp: Path, rounds: int, sides: list[tuple[str, str]]) -> dict[tuple[str, str], list]:
    """Run each (role, autocast) side `rounds` times, in a palindrome: A B C, C B A, A B C, ...

    The machine's speed drifts by 10-20% within minutes here. Reversing the order every round cancels a steady drift
    out of the ratios of the sides' mean times; timed once each, back to back, the later side takes all of it.
    """
    runs: dict[tuple[str, str], list] = {side: [] for side in sides}
    for r in range(rounds):
        for role, autocast in sides if r % 2 == 0 else sides[::-1]:
            runs[role, autocast].append(run_worker(role, {**spec, "autocast": autocast}, tmp))
    return runs


def _rel_diff(a: list[float], b: list[float]) -> float:
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=False)]
    return max(diffs) if diffs else float("nan")


def _mean_s(runs: list[dict]) -> float:
    return sum(r["seconds"] for r in runs) / len(runs)


def _reference_cells(name: str, runs: list[dict], check: dict, tokens: int, ours_s: float) -> dict:
    """One reference's numbers in a row: speed, ratio, memory, losses against peftlab's on the same batches."""
    first, seconds = runs[0], _mean_s(runs)  # every round trains the same seeded epoch: same batches and losses
    return {
        f"{name}_tok_s": tokens / seconds, f"{name}_ratio": seconds / ours_s, f"{name}_seconds": seconds,
        f"{name}_rounds_s": [r["seconds"] for r in runs], f"{name}_peak_mb": max(r["peak_mb"] for r in runs),
        f"losses_{name}": first["losses"], f"losses_peftlab_{name}": check["losses"],
        f"{name}_max_rel_diff": _rel_diff(first["losses"], check["losses"]),
        f"{name}_same_init": abs(first["init_checksum"] - check["init_checksum"])
        <= 1e-9 * max(first["init_checksum"], 1.0),
        f"{name}_rows_read": first["rows_read"], f"{name}_batches": first["batches"],
    }


def precision_row(method: str, autocast: str, runs: dict, spec: dict, tmp: Path, references: list[str]) -> dict:
    """One table row: peftlab against each reference in one autocast, with the math check on each one's batches."""
    ours = runs["peftlab", autocast]
    ours_s, tokens = _mean_s(ours), spec["real_tokens"]
    row = {"method": method, "autocast": autocast, "peftlab_tok_s": tokens / ours_s, "peftlab_seconds": ours_s,
           "peftlab_rounds_s": [r["seconds"] for r in ours], "peftlab_peak_mb": max(r["peak_mb"] for r in ours),
           "peftlab_gflops": FLOPS_PER_PARAM[method] * ours[0]["base_params"] * tokens / ours_s / 1e9,
           "peftlab_step_seconds": ours[0]["step_seconds"], "peftlab_steps": ours[0]["steps"]}
    checks: dict[str, dict] = {}  # batches -> peftlab's losses on them; TRL usually draws the Trainer's batches
    for name in references:
        ref_runs = runs[REFERENCES[name], autocast]
        key = json.dumps(ref_runs[0]["batches"])
        if key not in checks:
            checks[key] = run_worker("check", {**spec, "autocast": autocast, "batches": ref_runs[0]["batches"]}, tmp)
        row.update(_reference_cells(name, ref_runs, checks[key], tokens, ours_s))
        if name == "trl":
            row["trl_padding_free"] = ref_runs[0]["padding_free"]
    # The names the table and earlier JSON readers use for the Trainer's side.
    row.update(ref_tok_s=row["trainer_tok_s"], ratio=row["trainer_ratio"], ref_seconds=row["trainer_seconds"],
               ref_rounds_s=row["trainer_rounds_s"], ref_peak_mb=row["trainer_peak_mb"],
               losses_ref=row["losses_trainer"], losses_peftlab=row["losses_peftlab_trainer"],
               max_rel_diff=max(row[f"{n}_max_rel_diff"] for n in references),
               same_init=all(row[f"{n}_same_init"] for n in references), ref_rows_read=row["trainer_rows_read"])
    return row


def bench_method(method: str, base_spec: dict, tmp: Path, rounds: int = 2, references: tuple[str, ...] = ("trainer",),
                 autocasts: tuple[str, ...] = ("no",)) -> list[dict]:
    """The references, peftlab and the math checks for one method, in each autocast; one table row per autocast.

    All sides of all autocasts share one palindrome of rounds, so a bf16 row's speed-up over the fp32 row is as
    drift-free as the ratios to the references.
    """
    from peftlab.methods.registry import get_method

    spec = {**base_spec, "method": method, "lr": get_method(method).default_lr}
    sides = [(role, a) for a in autocasts for role in [*(REFERENCES[n] for n in references), "peftlab"]]
    runs = timed_sides(spec, tmp, rounds, sides)
    rows = [precision_row(method, a, runs, spec, tmp, list(references)) for a in autocasts]
    fp32 = next((r for r in rows if r["autocast"] == "no"), None)
    for row in rows:
        if row["autocast"] != "no" and fp32 is not None:
            # bf16 against peftlab's own fp32: speed, and how far its first five losses are from fp32's (same batches)
            row["speedup_vs_fp32"] = fp32["peftlab_seconds"] / row["peftlab_seconds"]
            same = row["trainer_batches"] == fp32["trainer_batches"]
            row["loss_diff_vs_fp32"] = _rel_diff(fp32["losses_peftlab"], row["losses_peftlab"]) if same else None
    return rows


def _seconds(values: list[float]) -> str:
    return " + ".join(f"{v:.1f}" for v in values) + " s"


def _losses(values: list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def _tolerance(dtype: str, autocast: str) -> float:
    """The math check's bar: fp32's 1e-3, or the 16-bit dtype's rounding where weights or autocast are 16-bit."""
    return MAX_REL_DIFF["bfloat16" if autocast == "bf16" and dtype == "float32" else dtype]


def markdown_table(rows: list[dict], sgemm: float | dict, infer_mb: float, dtype: str = "float32",
                   memory: str = "RSS") -> str:
    """The results as a markdown table, with each target printed next to its number.

    `sgemm` is the matmul ceiling, or one per autocast (`{"no": fp32, "bf16": bf16}`); `memory` names what the
    peak-memory columns hold: the process's RSS on the CPU, allocated GPU memory on CUDA. Columns of the TRL reference
    appear when a row has it.
    """
    ceilings = sgemm if isinstance(sgemm, dict) else {"no": sgemm, "bf16": sgemm}
    trl = any("trl_tok_s" in r for r in rows)
    head = ["method", "autocast", "ref tok/s", *(["TRL tok/s"] if trl else []), "peftlab tok/s", "ratio (target)",
            *(["ratio to TRL (target)"] if trl else []), "peftlab GFLOP/s", "% of sgemm (target)",
            f"ref peak {memory} MB", *([f"TRL peak {memory} MB"] if trl else []), f"peftlab peak {memory} MB",
            f"inference {memory} MB", "first-5 losses ref", *(["first-5 losses TRL"] if trl else []),
            "first-5 losses peftlab", "max rel diff (target)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        autocast = r.get("autocast", "no")
        pct = 100 * r["peftlab_gflops"] / ceilings[autocast]
        pct_target = f" (>= {100 * TARGET_SGEMM[r['method']]:.0f}%)" if r["method"] in TARGET_SGEMM else ""
        has_trl = "trl_tok_s" in r
        cells = [
            r["method"], autocast, f"{r['ref_tok_s']:.0f}", *([f"{r['trl_tok_s']:.0f}" if has_trl else "-"] * trl),
            f"{r['peftlab_tok_s']:.0f}", f"{r['ratio']:.2f}x (>= {TARGET_RATIO[r['method']]}x)",
            *([f"{r['trl_ratio']:.2f}x (>= {TARGET_RATIO_TRL}x)" if has_trl else "-"] * trl),
            f"{r['peftlab_gflops']:.1f}", f"{pct:.0f}%{pct_target}", f"{r['ref_peak_mb']:.0f}",
            *([f"{r['trl_peak_mb']:.0f}" if has_trl else "-"] * trl), f"{r['peftlab_peak_mb']:.0f}", f"{infer_mb:.0f}",
            _losses(r["losses_ref"]), *([_losses(r["losses_trl"]) if has_trl else "-"] * trl),
            _losses(r["losses_peftlab"]),
            f"{r['max_rel_diff']:.1e} (<= {_tolerance(dtype, autocast):g})"
            + ("" if r["same_init"] else " (different init!)"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_precision_lines(rows: list[dict]) -> str:
    """The headline per method: peftlab's best precision against each peer's best precision on this CPU, so that
    a peer's `bf16=True` counts where bf16 pays (on a CPU without fast bf16 both bests are fp32)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) < 2:
            continue  # one precision: the table's ratio is already the headline
        ours = max(mine, key=lambda r: r["peftlab_tok_s"])
        parts = []
        for peer, key in (("Trainer", "trainer_tok_s"), ("TRL", "trl_tok_s")):
            theirs = [r for r in mine if key in r]
            if theirs:
                best = max(theirs, key=lambda r: r[key])
                parts.append(f"{ours['peftlab_tok_s'] / best[key]:.2f}x the {peer}'s best "
                             f"({best.get('autocast', 'no')}, {best[key]:.0f} tok/s)")
        out.append(f"- {method}: peftlab at its best ({ours.get('autocast', 'no')}, {ours['peftlab_tok_s']:.0f} "
                   f"tok/s) is {' and '.join(parts)} (target >= {TARGET_RATIO.get(method, 2.0)}x)")
    return "\n".join(out)


def bf16_lines(rows: list[dict]) -> str:
    """bf16 autocast against peftlab's own fp32 row: speed-up (target 1.5x) and first-five-loss agreement."""
    out = []
    for r in rows:
        if "speedup_vs_fp32" not in r:
            continue
        diff = r["loss_diff_vs_fp32"]
        agree = "n/a (other batches)" if diff is None else f"{diff:.1e}"
        out.append(f"- {r['method']}: bf16 autocast {r['speedup_vs_fp32']:.2f}x peftlab's fp32 "
                   f"(target >= {TARGET_BF16_SPEEDUP}x); first-5 losses max rel diff to fp32 {agree}")
    return "\n".join(out)


@dataclass(frozen=True, kw_only=True)
class TrainBenchOptions:
    """What `peftlab bench train` was given. Keyword-only: fourteen options in a row are too easy to swap."""

    model: str  # packaged model name or local HF folder (replaced by the tiny random model under `smoke`)
    methods: tuple[str, ...]
    n: int  # DialogSum dialogues trained on
    max_length: int
    batch: int
    results: Path | None  # markdown file to append to; None: print only
    smoke: bool = False
    json_out: Path | None = None
    micro_tokens: int | None = None  # peftlab's train.micro_tokens; None: the config's
    rounds: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    references: tuple[str, ...] = ("trainer", "trl")
    autocasts: tuple[str, ...] = ("no",)  # `no`: as loaded; `bf16`: bf16 autocast over the fp32 weights


def _check_options(opts: TrainBenchOptions) -> tuple[str, ...]:
    """Refuse what cannot be measured before any side runs; return the references that can run here."""
    check_dtype(opts.dtype)
    check_autocasts(list(opts.autocasts), opts.device)
    unknown = [m for m in opts.methods if m not in FLOPS_PER_PARAM]
    if not opts.methods:  # `--methods ""` (or ",") measured nothing and printed an empty table, exit 0
        raise PeftlabError(f"bench train: --methods names no method; choose from {sorted(FLOPS_PER_PARAM)}")
    if unknown:
        raise PeftlabError(f"bench train: unknown methods {unknown}; choose from {sorted(FLOPS_PER_PARAM)}")
    return tuple(usable_references(list(opts.references)))


def run_train_bench(opts: TrainBenchOptions) -> list[dict]:
    """Benchmark each method against each reference in each autocast (every side alike); print the table, append
    it to `opts.results` (if given) and return the rows."""
    references = _check_options(opts)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(os.environ.get("PEFTLAB_BENCH_TMP") or tmp_name)  # set it to keep the workers' specs
        model = str(tiny_model(tmp / "tiny-llama")) if opts.smoke else opts.model
        _, items, _ = encode_dialogsum(model, opts.n, opts.max_length)
        spec = {"model": model, "batch": opts.batch, "max_length": opts.max_length, "seed": 0,
                "items": [[e.prompt_ids, e.target_ids] for e in items],
                "real_tokens": sum(e.length for e in items), "device": opts.device, "dtype": opts.dtype,
                "train": {} if opts.micro_tokens is None else {"micro_tokens": opts.micro_tokens}}
        # bf16 autocast rows are measured against the bf16 matmul ceiling, fp32 rows against the fp32 one.
        sgemm = {a: sgemm_gflops(opts.device, "bfloat16" if a == "bf16" else opts.dtype) for a in opts.autocasts}
        print(f"{opts.dtype} matmul {sgemm.get('no', 0.0):.1f} GFLOP/s, bf16 {sgemm.get('bf16', 0.0):.1f}; "
              f"{opts.n} dialogues, {spec['real_tokens']} real tokens; {machine_line(opts.device)}")
        infer_mb = run_worker("infer", spec, tmp)["peak_mb"]
        rows = []
        for method in opts.methods:
            rows += bench_method(method, spec, tmp, opts.rounds, references, opts.autocasts)
            for r in rows[-len(opts.autocasts):]:
                _print_rounds(r, references)
    report_train(rows, sgemm, infer_mb, opts)
    return rows


def results_title(opts: TrainBenchOptions) -> str:
    """The results file's heading for this run: model, data size, rounds and each setting off its default."""
    label = "tiny random model" if opts.smoke else Path(opts.model).name
    title = (f"Training throughput: {label}, n={opts.n}, max_length={opts.max_length}, batch={opts.batch}, "
             f"rounds={opts.rounds}")
    if opts.micro_tokens is not None:
        title += f", micro_tokens={opts.micro_tokens}"
    if opts.device != "cpu" or opts.dtype != "float32":
        title += f", {opts.device} {opts.dtype}"
    if opts.autocasts != ("no",):
        title += f", autocast {'+'.join(opts.autocasts)}"
    return title


def _print_rounds(r: dict, references: tuple[str, ...]) -> None:
    # The steps' own time against fit()'s whole: what is left is setup (on a GPU, first-use kernel loads).
    refs = ", ".join(f"{name} {_seconds(r[f'{name}_rounds_s'])}" for name in references)
    print(f"{r['method']} (autocast {r['autocast']}): {refs}, peftlab {_seconds(r['peftlab_rounds_s'])} (rounds in "
          f"palindrome order; peftlab's first round {r['peftlab_step_seconds']:.1f} s in its {r['peftlab_steps']} "
          "steps)", flush=True)


def report_train(rows: list[dict], sgemm: float | dict, infer_mb: float, opts: TrainBenchOptions) -> None:
    """Print the table and the math-check verdicts; append to the results file and write the JSON if asked."""
    table = markdown_table(rows, sgemm, infer_mb, opts.dtype, "RSS" if opts.device == "cpu" else "GPU")
    extra = "\n".join(part for part in (bf16_lines(rows), best_precision_lines(rows)) if part)
    print(table)
    if extra:
        print(extra)
    for r in rows:
        tol = _tolerance(opts.dtype, r.get("autocast", "no"))
        verdict = "OK" if r["max_rel_diff"] <= tol and r["same_init"] else "MISMATCH"
        print(f"math check {r['method']} (autocast {r.get('autocast', 'no')}): max relative loss difference "
              f"{r['max_rel_diff']:.1e} -> {verdict}")
    ceilings = sgemm if isinstance(sgemm, dict) else {"no": sgemm}
    ceiling = ", ".join(f"{'bf16' if a == 'bf16' else opts.dtype} matmul ceiling {g:.1f} GFLOP/s"
                        for a, g in ceilings.items())
    if opts.results is not None:
        body = f"{ceiling}.\n\n{table}" + (f"\n\n{extra}" if extra else "")
        append_results(opts.results, results_title(opts), body, opts.device)
        print(f"appended to {opts.results}")
    if opts.json_out is not None:
        opts.json_out.write_text(json.dumps({"sgemm_gflops": ceilings, "inference_peak_mb": infer_mb, "rows": rows}))
