"""`peftlab bench train`: training throughput of peftlab against the plain transformers Trainer + peft way.

Both sides train one epoch on the same token ids (the first n DialogSum dialogues, encoded once here) with the same
hyper-parameters, each in its own process (`peftlab.bench.workers`) so peak memory is per side. A math check runs
peftlab's loss for five steps on the reference's own first five batches: speed-ups must not change the losses.
How each side is built is written down in bench/README.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peftlab.core.errors import PeftlabError

REPO = Path(__file__).resolve().parents[3]
DEFAULT_RESULTS = Path("bench/RESULTS.md")
# The convention: a trained weight costs 6 FLOPs per token (forward, activation and weight gradients);
# a frozen one 4 (no weight gradient). N is the base model's parameter count.
FLOPS_PER_PARAM = {"full": 6, "lora": 4, "prompt-tuning": 4}
TARGET_RATIO = {"full": 1.5, "lora": 2.0, "prompt-tuning": 1.5}
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


def check_dtype(dtype: str) -> None:
    """The benchmarks name their dtype outright ("auto" would hide what was measured)."""
    from peftlab.core.errors import unknown_name
    from peftlab.models.device import DTYPES

    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, list(DTYPES))


def tiny_model(out: Path) -> Path:
    """--smoke: the test suite's tiny random Llama (tests/builders.py), so the smoke run needs no model download."""
    import importlib.util

    builders = REPO / "tests" / "builders.py"
    if not builders.is_file():
        raise PeftlabError(f"--smoke needs the source checkout: {builders} not found")
    spec = importlib.util.spec_from_file_location("peftlab_bench_builders", builders)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_causal(out)


def data_file(task_name: str) -> Path:
    """The task's shipped data file, relative to the working directory or else to the source checkout."""
    from peftlab.data.tasks import DEFAULT_DATA

    path = Path(DEFAULT_DATA[task_name])
    return path if path.is_file() else REPO / path


def prompt_format(model: str):
    """The tokenizer-side of `load_model` (no weights): enough to encode."""
    from peftlab.models.local import load_tokenizer, model_kind
    from peftlab.models.packaged import resolve_model_dir
    from peftlab.prompts.format import PromptFormat

    path = resolve_model_dir(model)
    tokenizer, kind = load_tokenizer(path), model_kind(path)
    return PromptFormat(tokenizer, kind, kind == "causal" and bool(getattr(tokenizer, "chat_template", None)))


def encode_dialogsum(model: str, n: int, max_length: int):
    """The first n DialogSum dev dialogues, encoded once with peftlab's encoder and the model's chat template."""
    from peftlab.data.tasks import get_task
    from peftlab.prompts.encoding import encode

    task = get_task("dialogsum")
    fmt = prompt_format(model)
    examples = task.load(data_file("dialogsum"))[:n]
    return fmt, [encode(task, ex, fmt, max_length) for ex in examples], examples


def run_worker(role: str, spec: dict, tmp: Path) -> dict:
    """Run one side in a fresh Python process and return its JSON answer."""
    spec_file, out_file = tmp / f"{role}-spec.json", tmp / f"{role}-out.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "peftlab.bench.workers", role, str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeftlabError(f"bench worker '{role}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out_file.read_text())


def timed_sides(spec: dict, tmp: Path, rounds: int) -> tuple[list[dict], list[dict]]:
    """Run the reference (A) and peftlab (B) `rounds` times each, in the order AB BA AB BA ...

    The machine's speed drifts by 10-20% within minutes here. Alternating which side goes first cancels a steady
    drift out of the ratio of the two sides' mean times; timed once each, back to back, the later side takes all of it.
    """
    refs, ours = [], []
    for r in range(rounds):
        for role in ("ref", "peftlab") if r % 2 == 0 else ("peftlab", "ref"):
            (refs if role == "ref" else ours).append(run_worker(role, spec, tmp))
    return refs, ours


def bench_method(method: str, base_spec: dict, tmp: Path, rounds: int = 2) -> dict:
    """Reference, math check and peftlab for one method; returns one table row's numbers."""
    from peftlab.methods.registry import get_method

    spec = {**base_spec, "method": method, "lr": get_method(method).default_lr}
    refs, ours = timed_sides(spec, tmp, rounds)
    ref = refs[0]  # every round trains the same seeded epoch: same batches, same losses
    check = run_worker("check", {**spec, "batches": ref["batches"]}, tmp)
    ref_s = sum(r["seconds"] for r in refs) / rounds
    ours_s = sum(r["seconds"] for r in ours) / rounds
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref["losses"], check["losses"], strict=False)]
    tokens = base_spec["real_tokens"]
    return {
        "method": method,
        "ref_tok_s": tokens / ref_s,
        "peftlab_tok_s": tokens / ours_s,
        "ratio": ref_s / ours_s,
        "peftlab_gflops": FLOPS_PER_PARAM[method] * ours[0]["base_params"] * tokens / ours_s / 1e9,
        "ref_peak_mb": max(r["peak_mb"] for r in refs),
        "peftlab_peak_mb": max(r["peak_mb"] for r in ours),
        "losses_ref": ref["losses"],
        "losses_peftlab": check["losses"],
        "max_rel_diff": max(diffs) if diffs else float("nan"),
        "same_init": abs(ref["init_checksum"] - check["init_checksum"]) <= 1e-9 * max(ref["init_checksum"], 1.0),
        "ref_seconds": ref_s,
        "peftlab_seconds": ours_s,
        "ref_rounds_s": [r["seconds"] for r in refs],
        "peftlab_rounds_s": [r["seconds"] for r in ours],
        "peftlab_step_seconds": ours[0]["step_seconds"],
        "ref_rows_read": ref["rows_read"],
        "peftlab_steps": ours[0]["steps"],
    }


def _seconds(values: list[float]) -> str:
    return " + ".join(f"{v:.1f}" for v in values) + " s"


def _losses(values: list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def markdown_table(rows: list[dict], sgemm: float, infer_mb: float, dtype: str = "float32",
                   memory: str = "RSS") -> str:
    """The results as a markdown table, with each target printed next to its number.

    `memory` names what the peak-memory columns hold: the process's RSS on the CPU, allocated GPU memory on CUDA.
    """
    head = ("method", "ref tok/s", "peftlab tok/s", "ratio (target)", "peftlab GFLOP/s", "% of sgemm (target)",
            f"ref peak {memory} MB", f"peftlab peak {memory} MB", f"inference {memory} MB", "first-5 losses ref",
            "first-5 losses peftlab", f"max rel diff (<= {MAX_REL_DIFF[dtype]:g})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pct = 100 * r["peftlab_gflops"] / sgemm
        pct_target = f" (>= {100 * TARGET_SGEMM[r['method']]:.0f}%)" if r["method"] in TARGET_SGEMM else ""
        cells = (
            r["method"], f"{r['ref_tok_s']:.0f}", f"{r['peftlab_tok_s']:.0f}",
            f"{r['ratio']:.2f}x (>= {TARGET_RATIO[r['method']]}x)", f"{r['peftlab_gflops']:.1f}",
            f"{pct:.0f}%{pct_target}", f"{r['ref_peak_mb']:.0f}", f"{r['peftlab_peak_mb']:.0f}", f"{infer_mb:.0f}",
            _losses(r["losses_ref"]), _losses(r["losses_peftlab"]),
            f"{r['max_rel_diff']:.1e}" + ("" if r["same_init"] else " (different init!)"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name where Linux says it (`platform.processor()` there is only "x86_64"): the same two-core
    sandbox has run on an AMD EPYC (Zen 3, AVX2) and an Intel Xeon with AMX, and the ratios differ between them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "")
    return " ".join(part for part in (platform.machine(), info.get("model name", ""), isa) if part)


def machine_line(device: str = "cpu") -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return (f"{datetime.date.today().isoformat()}, {cpu_model()}, "
            f"{os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")


def append_results(path: Path, title: str, body: str, device: str = "cpu") -> None:
    """Append a dated section to the results file, creating it with a header first."""
    from peftlab.core.files import write_text_atomic

    old = path.read_text() if path.is_file() else (
        "# peftlab benchmark results\n\nAppended by `peftlab bench train` and `peftlab bench eval`; "
        "bench/README.md says how each side is built.\n"
    )
    write_text_atomic(path, f"{old.rstrip()}\n\n## {title} ({machine_line(device)})\n\n{body}\n")


def run_train_bench(
    model: str, methods: list[str], n: int, max_length: int, batch: int, results: Path | None,
    smoke: bool = False, json_out: Path | None = None, micro_tokens: int | None = None, rounds: int = 2,
    device: str = "cpu", dtype: str = "float32",
) -> list[dict]:
    """Benchmark each method; print the table, append it to `results` (if given) and return the rows."""
    check_dtype(dtype)
    unknown = [m for m in methods if m not in FLOPS_PER_PARAM]
    if unknown:
        raise PeftlabError(f"bench train: unknown methods {unknown}; choose from {sorted(FLOPS_PER_PARAM)}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(os.environ.get("PEFTLAB_BENCH_TMP") or tmp_name)  # set it to keep the workers' specs
        if smoke:
            model = str(tiny_model(tmp / "tiny-llama"))
        _, items, _ = encode_dialogsum(model, n, max_length)
        spec = {"model": model, "batch": batch, "max_length": max_length, "seed": 0,
                "items": [[e.prompt_ids, e.target_ids] for e in items],
                "real_tokens": sum(e.length for e in items), "device": device, "dtype": dtype,
                "train": {} if micro_tokens is None else {"micro_tokens": micro_tokens}}
        sgemm = sgemm_gflops(device, dtype)
        print(f"{dtype} matmul {sgemm:.1f} GFLOP/s; {n} dialogues, {spec['real_tokens']} real tokens; "
              f"{machine_line(device)}")
        infer_mb = run_worker("infer", spec, tmp)["peak_mb"]
        rows = []
        for method in methods:
            rows.append(bench_method(method, spec, tmp, rounds))
            r = rows[-1]
            # The steps' own time against fit()'s whole: what is left is setup (on a GPU, first-use kernel loads).
            print(f"{method}: reference {_seconds(r['ref_rounds_s'])}, peftlab {_seconds(r['peftlab_rounds_s'])} "
                  f"(rounds in ABBA order; peftlab's first round {r['peftlab_step_seconds']:.1f} s in its "
                  f"{r['peftlab_steps']} steps)", flush=True)
    label = "tiny random model" if smoke else Path(model).name
    title = f"Training throughput: {label}, n={n}, max_length={max_length}, batch={batch}, rounds={rounds}"
    if micro_tokens is not None:
        title += f", micro_tokens={micro_tokens}"
    if device != "cpu" or dtype != "float32":
        title += f", {device} {dtype}"
    report_train(rows, sgemm, infer_mb, title, results, json_out, device, dtype)
    return rows


def report_train(rows: list[dict], sgemm: float, infer_mb: float, title: str, results: Path | None,
                 json_out: Path | None, device: str = "cpu", dtype: str = "float32") -> None:
    """Print the table and the math-check verdicts; append to the results file and write the JSON if asked."""
    table = markdown_table(rows, sgemm, infer_mb, dtype, "RSS" if device == "cpu" else "GPU")
    print(table)
    for r in rows:
        verdict = "OK" if r["max_rel_diff"] <= MAX_REL_DIFF[dtype] and r["same_init"] else "MISMATCH"
        print(f"math check {r['method']}: max relative loss difference {r['max_rel_diff']:.1e} -> {verdict}")
    if results is not None:
        append_results(results, title, f"{dtype} matmul ceiling {sgemm:.1f} GFLOP/s.\n\n{table}", device)
        print(f"appended to {results}")
    if json_out is not None:
        json_out.write_text(json.dumps({"sgemm_gflops": sgemm, "inference_peak_mb": infer_mb, "rows": rows}))
