"""Where peftlab's training step spends its time, fp32 against bf16 autocast: a profile, not a benchmark.

    .venv/bin/python -m research.bf16_step_profile [--method lora] [--steps 4]

Runs `peftlab bench train`'s peftlab side (the same spec: the first 64 DialogSum dialogues, 512 tokens, batch 4,
SmolLM2-135M) for a few steps of `train.step.train_step` under torch.profiler, once in fp32 and once under bf16
autocast, and prints the operators that took the most self CPU time in each, grouped into what the issue asks
about: matmuls (GEMM), casts (`aten::to`/`_to_copy`/`copy_`), attention, the loss and LM head, norms and the rest.
Run it alone on the machine: it times nothing for a table, but a second job shifts the shares.

`--fp32-attention` adds a third pass: bf16 autocast with SDPA up-cast to fp32 (q, k, v and a float mask cast up,
the output cast back), to see what the lever "attention in fp32 inside a bf16 step" would win before building it.
`--attention-alone` times SDPA forward+backward by itself at the step's shape (4 rows x 512 tokens, 9 query heads
over 3 key/value heads of 64, causal), in fp32, bf16 and bf16 up-cast: whether the kernel itself is slower in bf16.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from peftlab.bench.common import encode_dialogsum
from peftlab.bench.workers import _peftlab_model
from peftlab.prompts.batches import token_batches
from peftlab.train.step import step_inputs, train_step

GROUPS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_mkldnn"),
    "casts": ("aten::to", "aten::_to_copy", "aten::copy_"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "loss and softmax": ("cross_entropy", "log_softmax", "nll_loss", "_softmax"),
    "norm": ("rms", "rsqrt", "aten::pow", "aten::mean"),
}


def _group(name: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other")


@contextlib.contextmanager
def fp32_attention():
    """Every SDPA call (transformers' and peftlab's kernels look it up on `torch.nn.functional` at call time) runs
    in fp32 on up-cast inputs, its output cast back to the inputs' dtype."""
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if query.dtype != torch.bfloat16:
            return real(query, key, value, attn_mask, *args, **kwargs)
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        with torch.autocast("cpu", enabled=False):
            out = real(query.float(), key.float(), value.float(), mask, *args, **kwargs)
        return out.to(query.dtype)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def profile_steps(method: str, autocast: str, steps: int) -> tuple[float, dict[str, float], list]:
    """Seconds per step (after one warm-up step) and the self CPU seconds per group and per op."""
    spec = {"model": "smollm2-135m-instruct", "method": method, "lr": 1e-4, "batch": 4, "max_length": 512,
            "seed": 0, "autocast": autocast}
    cfg, _, loaded, task, model, _ = _peftlab_model(spec)
    fmt, items, _ = encode_dialogsum(spec["model"], 64, 512)
    batches = token_batches(items, cfg.train.batch_tokens, cfg.train.batch_size, seed=0)[: steps + 1]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator = Accelerator(cpu=True)
    inputs = [step_inputs(items, [b], loaded.kind, fmt.tokenizer.pad_token_id, right=True, share=False)[0]
              for b in batches]
    dtype = torch.bfloat16 if autocast == "bf16" else None
    model.train()

    def step(micro):
        train_step(model, micro, loaded.kind, accelerator, params, optimizer, scheduler, 1.0, autocast=dtype)

    step(inputs[0])  # warm-up: allocation and kernel selection
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for batch in inputs[1:]:
            step(batch)
        seconds = (time.perf_counter() - t0) / steps
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6 / steps) for e in prof.key_averages()), key=lambda x: -x[1])
    groups: dict[str, float] = collections.defaultdict(float)
    for name, s in ops:
        groups[_group(name)] += s
    return seconds, dict(groups), ops[:12]


def _attention_ms(dtype: torch.dtype, up: bool, rounds: int) -> float:
    """Median milliseconds of one causal GQA SDPA forward+backward on `dtype` inputs (`up`: cast to fp32 first)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, heads, 512, 64, generator=gen).to(dtype).requires_grad_() for heads in (9, 3, 3))

    def once():
        qq, kk, vv = (t.float() for t in (q, k, v)) if up else (q, k, v)
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True).to(dtype).sum().backward()

    for _ in range(3):
        once()  # allocation and kernel selection
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[rounds // 2]


def attention_alone(rounds: int = 10) -> dict[str, float]:
    """SDPA by itself at the step's shape, per input precision: median ms of a forward+backward."""
    return {"fp32": _attention_ms(torch.float32, False, rounds), "bf16": _attention_ms(torch.bfloat16, False, rounds),
            "bf16, up-cast to fp32": _attention_ms(torch.bfloat16, True, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fp32-attention", action="store_true", help="also bf16 with SDPA in fp32")
    parser.add_argument("--attention-alone", action="store_true", help="only time SDPA by itself, per precision")
    args = parser.parse_args()
    if args.attention_alone:
        for label, ms in attention_alone().items():
            print(f"SDPA forward+backward, 4 x 512 tokens, inputs {label}: {ms:.1f} ms (median of 10)")
        return
    variants = [("no", False), ("bf16", False)] + ([("bf16", True)] if args.fp32_attention else [])
    for autocast, up in variants:
        with fp32_attention() if up else contextlib.nullcontext():
            seconds, groups, top = profile_steps(args.method, autocast, args.steps)
        label = f"{autocast}{', attention in fp32' if up else ''}"
        print(f"\n{args.method}, autocast {label}: {seconds:.2f} s per step (batch 4 x up to 512 tokens)")
        for g, s in sorted(groups.items(), key=lambda x: -x[1]):
            print(f"  {g:18s} {s:6.2f} s  {100 * s / sum(groups.values()):4.0f}%")
        for name, s in top:
            print(f"    {s:6.3f} s  {name}")


if __name__ == "__main__":
    main()
