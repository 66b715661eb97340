"""How fast is each piece of one decode step at SmolLM2's shapes? The microbenchmarks behind bench/RESULTS.md's levers.

    .venv/bin/python -m research.decode_microbench [--repeats 3]

Random tensors shaped like SmolLM2-135M at a 64-row decode step: 30 layers, 9 query heads over 3 key/value heads
of 64, hidden 576, MLP 1536; prompts of 126-430 tokens, left-padded in 525-column cache buffers. Every timing
loops over 30 distinct layers' tensors, so the cache is read from memory as in decoding, and prints ms per layer.

- attention: SDPA's CPU kernel against `kvcache.single_query_attention`, both per `kvcache.row_groups` group (8,
  and 4 for the latter), in GB/s of cache read; beside them what the memory allows, `sum` over the same slices,
  and keys @ queries^T alone;
- projections: q/k/v and gate/up as separate GEMMs against one fused GEMM each, at 64, 32, 8 and 1 rows;
- weights first: a layer's seven linears as `F.linear(x, W)` against (W @ x^T)^T (left transposed; the
  "linears weights-first" variants of `research/decode_levers.py` copy it back to row-major), and the LM head
  whole, in 4096-column slices, and weights-first in slices, at 64, 32, 16 and 4 rows;
- compaction: the finished rows' removal as a gather of all columns into new buffers against moving the kept rows
  up in place over the written columns.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftlab.kernels.kvcache import row_groups, single_query_attention

LAYERS, ROWS, CAPACITY, HEAD = 30, 64, 525, 64


class Attention:  # what the attention functions read off a transformers attention module
    num_key_value_groups, is_causal, training = 3, True, False


def per_layer(fn, tensors, repeats: int) -> list[float]:
    """ms per layer of `fn` over every layer's tensors, once per repeat."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for args in tensors:
            fn(*args)
        times.append((time.perf_counter() - t0) / len(tensors) * 1e3)
    return times


def show(name: str, times: list[float], megabytes: float | None = None) -> None:
    rates = "" if megabytes is None else " (" + " ".join(f"{megabytes / t:.1f}" for t in times) + " GB/s)"
    print(f"| {name} | {' '.join(f'{t:.2f}' for t in times)}{rates} |")


def attention(repeats: int) -> None:
    lengths = torch.randint(126, 430, (ROWS,), generator=torch.Generator().manual_seed(0)).sort().values
    width = int(lengths.max())
    caches = [(torch.randn(ROWS, 3, CAPACITY, HEAD), torch.randn(ROWS, 3, CAPACITY, HEAD)) for _ in range(LAYERS)]
    query = torch.randn(ROWS, 9, 1, HEAD)
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None])[:, None, None, :]

    def grouped(fn, n_groups):
        def run(keys, values):
            return torch.cat([fn(Attention(), query[a:b], keys[a:b, :, f:width], values[a:b, :, f:width],
                                 mask[a:b, ..., f:], scaling=HEAD**-0.5, dropout=0.0)
                              for a, b, f in row_groups(lengths, width, n_groups)])
        return run

    def cache_mb(n_groups):
        return sum((b - a) * 3 * (width - f) * HEAD * 4 * 2 for a, b, f in row_groups(lengths, width, n_groups)) / 1e6

    def sdpa(*args, **kwargs):
        return sdpa_attention_forward(*args, **kwargs)[0]

    q = query.view(ROWS, 3, 3, HEAD)
    with torch.inference_mode():
        torch.testing.assert_close(grouped(single_query_attention, 8)(*caches[0]), grouped(sdpa, 8)(*caches[0]))
        print(f"\n{ROWS} rows, prompts {int(lengths.min())}-{width} tokens; ms per layer, one column per repeat\n")
        print("| decode attention | ms per layer |\n|---|---|")
        show("SDPA's CPU kernel, 8 row groups", per_layer(grouped(sdpa, 8), caches, repeats), cache_mb(8))
        show("single_query_attention, 8 row groups", per_layer(grouped(single_query_attention, 8), caches, repeats),
             cache_mb(8))
        show("single_query_attention, 4 row groups", per_layer(grouped(single_query_attention, 4), caches, repeats),
             cache_mb(4))
        full = ROWS * 3 * width * HEAD * 4 / 1e6
        show("keys @ queries^T alone, no groups", per_layer(lambda k, v: torch.matmul(k[:, :, :width], q.transpose(
            -1, -2)), caches, repeats), full)
        show("sum of the key and value slices, no groups",
             per_layer(lambda k, v: (k[:, :, :width].sum(), v[:, :, :width].sum()), caches, repeats), 2 * full)


def projections(repeats: int) -> None:
    shapes = {"q": 576, "k": 192, "v": 192, "gate": 1536, "up": 1536}
    weights = [{k: torch.randn(n, 576) for k, n in shapes.items()} for _ in range(LAYERS)]
    for w in weights:
        w["qkv"], w["gate_up"] = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["gate"], w["up"]])

    def separate(x, w):
        return [F.linear(x, w[k]) for k in shapes]

    def fused(x, w):
        return [*F.linear(x, w["qkv"]).split([576, 192, 192], -1), *F.linear(x, w["gate_up"]).chunk(2, -1)]

    print("\n| q/k/v and gate/up projections | ms per layer |\n|---|---|")
    with torch.inference_mode():
        for rows in (64, 32, 8, 1):
            x = torch.randn(rows, 576)
            for got, want in zip(fused(x, weights[0]), separate(x, weights[0]), strict=True):
                torch.testing.assert_close(got, want)
            show(f"{rows} rows, separate", per_layer(separate, [(x, w) for w in weights], repeats))
            show(f"{rows} rows, fused", per_layer(fused, [(x, w) for w in weights], repeats))


def weights_first(repeats: int) -> None:
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = [[torch.randn(n, k) for n, k in shapes] for _ in range(LAYERS)]
    head = torch.randn(49152, 576)
    flush = torch.empty(64 * 2**20 // 4)  # 64 MB written between head calls, so the head comes from memory

    def layer(fn):
        return lambda x576, x1536, ws: [fn(x1536 if w.shape[1] == 1536 else x576, w) for w in ws]

    def linear(x, w):
        return F.linear(x, w)

    def left(x, w):
        return (w @ x.t()).t()

    def head_runs(fn, x):
        times = []
        for _ in range(repeats):
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    heads = {
        "F.linear, whole": lambda x: F.linear(x, head),
        "F.linear, 4096-column slices": lambda x: torch.cat([F.linear(x, w) for w in head.split(4096)], -1),
        "weights first, 4096-column slices": lambda x: torch.cat([w @ x.t() for w in head.split(4096)]).t(),
    }
    print("\n| a layer's seven linears | ms per layer |\n|---|---|")
    with torch.inference_mode():
        for rows in (64, 32, 16, 4):
            x576, x1536 = torch.randn(rows, 576), torch.randn(rows, 1536)
            for got, want in zip(layer(left)(x576, x1536, weights[0]), layer(linear)(x576, x1536, weights[0]),
                                 strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # another summation order
            args = [(x576, x1536, ws) for ws in weights]
            show(f"{rows} rows, F.linear(x, W)", per_layer(layer(linear), args, repeats))
            show(f"{rows} rows, (W @ x^T)^T", per_layer(layer(left), args, repeats))
        print("\n| LM head, 49,152 x 576 | ms per call |\n|---|---|")
        for rows in (64, 32, 16, 4):
            x = torch.randn(rows, 576)
            for name, fn in heads.items():
                show(f"{rows} rows, {name}", head_runs(fn, x))


def compaction(repeats: int) -> None:
    written = 420
    keep = torch.arange(ROWS)[torch.arange(ROWS) % 8 != 3]  # every eighth row finished

    def gather(buf):
        return buf[keep]

    def in_place(buf):
        for new, old in enumerate(keep.tolist()):
            if new != old:
                buf[new, :, :written] = buf[old, :, :written]
        return buf[: len(keep)]

    print("\n| finished-row compaction, 56 of 64 rows kept | ms per layer (keys and values) |\n|---|---|")
    with torch.inference_mode():
        for name, fn in (("gather into new buffers", gather), ("moved up in place", in_place)):
            times = []
            for _ in range(repeats):  # fresh buffers each repeat: a gather's new buffer is fresh memory each time
                buffers = [(torch.randn(ROWS, 3, CAPACITY, HEAD),) for _ in range(2 * LAYERS)]
                times.append(2 * per_layer(fn, buffers, 1)[0])
            show(name, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    attention(args.repeats)
    projections(args.repeats)
    weights_first(args.repeats)
    compaction(args.repeats)


if __name__ == "__main__":
    main()
