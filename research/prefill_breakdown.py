"""Where does the greedy decoder's prefill spend its time, and how far is it from the matmul ceiling it could reach?

    .venv/bin/python -m research.prefill_breakdown --n 64 --repeats 3

Prefill (`peftlab.evaluate.decode._prefill`) is most of an evaluation run's time, so this asks whether it is bound
by its FLOPs or by something a code change could remove. It prints, for the same n DialogSum prompts as `peftlab
bench eval`:

- the prefill's FLOPs (the linears' 2 x parameters per token after the shared opening, plus causal attention) and
  its achieved GFLOP/s, best of `--repeats`;
- two ceilings measured here: `bench.sgemm_gflops` (2048 squared) and the GEMMs at the prefill's own shapes (one
  1024-token group through a layer's seven linears);
- a profile of one more prefill, split into matmuls, attention and the rest (elementwise ops, copies, fills).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import peftlab.evaluate.decode as decode
from peftlab.bench.common import encode_dialogsum, machine_line
from peftlab.bench.train_bench import sgemm_gflops
from peftlab.core.allocator import reuse_freed_memory
from peftlab.kernels.shared_prefix import opening_length
from peftlab.models.loading import load_model
from peftlab.prompts.batches import forward_tokens


def prefill_flops(model, prompts: list[list[int]], skip: int) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of prefilling `prompts` after their shared first `skip` tokens."""
    cfg = model.config.get_text_config()
    linear_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    tokens = sum(len(p) - skip for p in prompts)
    # a query at position j attends j + 1 keys: 2 FLOPs per key for the scores and 2 for the weighted values
    per_layer = 4 * cfg.num_attention_heads * cfg.head_dim
    attention = sum(per_layer * (j + 1) for p in prompts for j in range(skip, len(p))) * cfg.num_hidden_layers
    return 2.0 * linear_params * tokens, float(attention)


def layer_gemm_gflops(model, rows: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of one layer's linears (weights of layer 0) on `rows` tokens: the ceiling at the prefill's shapes."""
    layer = model.model.layers[0]
    weights = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    flops = sum(2 * rows * w.numel() for w in weights)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(x[w.shape[1]], w)
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def op_split(prof) -> Counter:
    """Self CPU seconds per kind of op: matmul, attention, the rest."""
    split: Counter = Counter()
    for e in prof.key_averages():
        kind = "matmul" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else (
            "attention" if "scaled_dot_product" in e.key else "rest")
        split[kind] += e.self_cpu_time_total / 1e6
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reuse_freed_memory()  # as `peftlab`'s CLI runs (peftlab.core.allocator)

    fmt, items, _ = encode_dialogsum(args.model, args.n, 1024)
    model = load_model(args.model).model.eval()
    prompts = sorted((e.prompt_ids for e in items), key=len)
    skip = opening_length(prompts)
    linear, attention = prefill_flops(model, prompts, skip)
    budget, device = forward_tokens("cpu"), torch.device("cpu")
    capacity = len(prompts[-1]) + 60  # the cache's width when decoding 60 new tokens
    run = (model, prompts, fmt.tokenizer.pad_token_id, capacity, budget, device)
    print(machine_line())
    print(f"{args.n} prompts, mean {sum(map(len, prompts)) / len(prompts):.0f} tokens, shared opening {skip}; "
          f"prefill {(linear + attention) / 1e9:.0f} GFLOP ({attention / (linear + attention):.1%} attention)")
    with torch.inference_mode(), decode.column_blocks(model):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            decode._prefill(*run)
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode._prefill(*run)
        shapes = layer_gemm_gflops(model, budget)
    best = min(times)
    split = op_split(prof)
    total = sum(split.values())
    sgemm = sgemm_gflops()
    print(f"prefill s/dialogue: {' '.join(f'{t / args.n:.3f}' for t in times)} (best {best / args.n:.3f})")
    print(f"achieved {(linear + attention) / best / 1e9:.1f} GFLOP/s; sgemm 2048^2 {sgemm:.1f}; "
          f"a layer's linears on {budget} rows {shapes:.1f}")
    print("profiled prefill, self CPU time: " + ", ".join(
        f"{k} {v:.2f} s ({v / total:.0%})" for k, v in split.most_common()))
    print(f"matmuls at {linear / split['matmul'] / 1e9:.1f} GFLOP/s in the profile; "
          f"attention at {attention / max(split['attention'], 1e-9) / 1e9:.1f}")


if __name__ == "__main__":
    main()
