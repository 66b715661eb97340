"""What does each of the greedy decoder's levers buy on DialogSum? An ablation, measured side by side in one process.

    .venv/bin/python -m research.decode_levers --n 64 --repeats 2 [--only "variant,variant"]

Each variant turns one lever of `peftlab.evaluate.decode` off, or tries one the decoder does not use, and decodes
the same n prompts (60 new tokens); variants run interleaved, `--repeats` times (in reverse order every other
time), and the best time of each part (prefill, decode, total) is kept, so a background hiccup hurts one sample,
not one variant.
Prints seconds per dialogue, each variant's ratios to the full decoder, and whether its outputs equal the full
decoder's. bench/RESULTS.md records the outcome next to the prediction.

With `--first-call`, every sample is a fresh child process that loads the model and times its first decode, with
no warm-up: what a one-off evaluation pays, page faults of memory the process has not used yet included.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers.masking_utils import sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import peftlab.evaluate.decode as decode
import peftlab.kernels.kvcache as kvcache
from peftlab.bench.common import encode_dialogsum, machine_line
from peftlab.core.allocator import reuse_freed_memory
from peftlab.kernels.memory import fused_rmsnorm
from peftlab.models.loading import load_model


def gather_rows(self, indices: torch.Tensor) -> None:
    """Finished-row compaction as `BufferLayer` did it before moving rows in place: every column of the kept rows
    gathered into new buffers."""
    if self.is_initialized:
        self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
        self.first = [self.first[i] for i in indices.tolist()]
        self._refresh()


_write_row = kvcache.BufferLayer.write_row


def write_row_zeroed(self, row: int, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
    """Prefill as `BufferLayer` did it before leaving padding untouched: each row's left padding zeroed as written."""
    _write_row(self, row, keys, values, width)
    self.expose(row, 0)


def _weights_first(module: torch.nn.Linear, x: torch.Tensor, width: int | None = None, few: int = 128) -> torch.Tensor:
    """`module(x)` as (W @ x^T)^T over at most `few` rows (the head in `width`-column slices), else `F.linear`."""
    rows = x.reshape(-1, x.shape[-1])
    slices = module.weight.split(width or module.weight.shape[0])
    if rows.shape[0] > few:
        out = torch.cat([F.linear(rows, w) for w in slices], dim=-1)
    else:  # a lone slice goes uncopied (torch.cat copies even one tensor); the product goes back to row-major,
        # since the ops after a linear ran slower on the transposed view than the copy costs
        xt = rows.t()
        out = (torch.cat([w @ xt for w in slices]) if len(slices) > 1 else slices[0] @ xt).t().contiguous()
    out = out if module.bias is None else out + module.bias
    return out.reshape(*x.shape[:-1], module.weight.shape[0])


@contextlib.contextmanager
def weights_first_linears(model, width: int | None = None, few: int = 128):
    """In place of `decode.column_blocks`: every plain linear weights-first on at most `few` rows, the LM head
    also sliced."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    for m in linears:
        m.forward = functools.partial(_weights_first, m, width=(width or decode.HEAD_COLUMNS) if m is head else None,
                                      few=few)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


COLUMN_BLOCKS = decode.column_blocks  # the decoder's own, for variants that replace it and still want it


@contextlib.contextmanager
def blocks_and_fused_norms(model):
    """The decoder's LM-head slices, and `memory.fused_rmsnorm`'s norms for as long as the decoding lasts (the
    script's model is freshly loaded, so no norm had a replaced forward before)."""
    with COLUMN_BLOCKS(model):
        fused_rmsnorm(model)
        try:
            yield
        finally:
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    vars(module).pop("forward", None)


def _llama_layer(layer, hidden, rope, cache_layer, mask, groups) -> torch.Tensor:
    """`LlamaDecoderLayer.forward` for one new token per row, its modules called as the layer calls them."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    heads = (x.shape[0], 1, -1, attn.head_dim)  # (rows, 1 token, heads, head size), then heads first
    q, k = (proj(x).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    q, k = apply_rotary_pos_emb(q, k, *rope)
    keys, values = cache_layer.update(k, attn.v_proj(x).view(heads).transpose(1, 2))
    out, _ = kvcache.grouped_sdpa(attn, q, keys, values, mask, row_groups=groups, scaling=attn.scaling)
    hidden = hidden + attn.o_proj(out.reshape(x.shape[0], 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def layer_by_layer_step(model, grouped: bool):
    """In place of `decode.decode_step`: the step without the model's forward machinery (a 4D mask built every
    step; keyword dispatch and output records in every layer). The mask is made boolean once a step and the
    attention goes straight to `kvcache.grouped_sdpa`. Llama layers only (the script's SmolLM2)."""
    assert grouped, "the layer-by-layer step runs the grouped attention only"
    inner = model.model

    def step(token, position, mask, cache, groups) -> torch.Tensor:
        hidden = inner.embed_tokens(token[:, None])
        rope = inner.rotary_emb(hidden, position[:, None])
        mask = mask.bool()[:, None, None, :]
        for layer, cache_layer in zip(inner.layers, cache.layers, strict=True):
            hidden = _llama_layer(layer, hidden, rope, cache_layer, mask, groups)
        return model.lm_head(inner.norm(hidden))[:, -1]

    return step


VARIANTS = {
    "all levers": {},
    "masked left-padded prefill": {"takes_unmasked_rows": lambda model: False},
    "compact at every finished row": {"COMPACT_FRACTION": 10**9},
    "decode attention over the whole padded cache": {"kvcache.DECODE_GROUPS": 1},
    "prefill groups of 4096 tokens": {"prefill_tokens": 4096},
    "prefill's last layer at every position": {"window_kwargs": lambda model, positions: {}},
    "prompts' shared opening run in every group": {"opening_length": lambda prompts: 0},
    "LM head as one GEMM": {"HEAD_COLUMNS": 10**9},
    "decode attention through SDPA's CPU kernel": {"kvcache.GROUP_ATTENTION": kvcache.sdpa_kernel_attention},
    "decode attention as two single-query GEMMs": {"kvcache.GROUP_ATTENTION": kvcache.single_query_attention},
    "decode attention in 4 row groups": {"kvcache.DECODE_GROUPS": 4},
    "finished rows gathered into new buffers": {"kvcache.BufferLayer.batch_select_indices": gather_rows},
    "left padding zeroed at prefill": {"kvcache.BufferLayer.write_row": write_row_zeroed},
    "RMSNorm fused (F.rms_norm) while decoding": {"column_blocks": blocks_and_fused_norms},
    "linears weights-first on at most 128 rows": {"column_blocks": weights_first_linears},
    "linears weights-first on at most 8 rows": {"column_blocks": functools.partial(weights_first_linears, few=8)},
    "decode steps layer by layer (Llama layers)": {"decode_step": layer_by_layer_step},
    "decode mask as booleans (SDPA converts it in every call)": {"kvcache.eager_mask": sdpa_mask},
}


def _target(name: str):
    """(owner, attribute) for a variant's setting: `decode`'s own, or under `kvcache.` the cache module's; a dotted
    path (`kvcache.BufferLayer.batch_select_indices`) reaches into a class."""
    *path, attr = name.split(".")
    owner = decode
    if path and path[0] == "kvcache":
        owner, path = kvcache, path[1:]
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


@contextlib.contextmanager
def patched(changes: dict):
    old = {k: getattr(*_target(k)) for k in changes}
    for k, v in changes.items():
        setattr(*_target(k), v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(*_target(k), v)


def timed_decode(model, prompts, stops, pad, prefill_tokens: int | None = None) -> tuple[float, float, list]:
    """(prefill seconds, total seconds, outputs) of one greedy_decode call."""
    spent = {}
    prefill = decode._prefill

    def timed_prefill(*args, **kwargs):
        t0 = time.perf_counter()
        out = prefill(*args, **kwargs)
        spent["prefill"] = time.perf_counter() - t0
        return out

    with patched({"_prefill": timed_prefill}):
        t0 = time.perf_counter()
        out = decode.greedy_decode(model, prompts, 60, stops, pad, prefill_tokens)
        total = time.perf_counter() - t0
    return spent["prefill"], total, out


def run_variant(model, prompts, stops, pad, name: str) -> tuple[float, float, list]:
    """(prefill seconds, total seconds, outputs) of one decode with variant `name`'s changes."""
    changes = dict(VARIANTS[name])
    budget = changes.pop("prefill_tokens", None)  # an argument, not a module setting; None: the default
    with patched(changes):
        return timed_decode(model, prompts, stops, pad, budget)


def first_call(name: str, model_name: str, n: int) -> tuple[float, float, str, float]:
    """A fresh process's first decode with variant `name`: (prefill s, total s, digest of the outputs, the
    process's peak RSS in MB)."""
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", name, "--model", model_name, "--n", str(n)],
                         check=True, capture_output=True, text=True).stdout
    pre, total, digest, rss = json.loads(out.strip().splitlines()[-1])
    return pre, total, digest, rss


def load(model_name: str, n: int, with_model: bool = True):
    """(model or None, prompts sorted by length, stop ids, pad id)."""
    fmt, items, _ = encode_dialogsum(model_name, n, 1024)
    model = load_model(model_name, device="cpu", dtype=torch.float32).model.eval() if with_model else None
    prompts = sorted((e.prompt_ids for e in items), key=len)
    return model, prompts, fmt.stop_token_ids, fmt.tokenizer.pad_token_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variants to run beside 'all levers'")
    parser.add_argument("--first-call", action="store_true", help="each sample a fresh process's first decode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reuse_freed_memory()  # as `peftlab`'s CLI runs (peftlab.core.allocator)
    if args.child:
        with torch.inference_mode():
            pre, total, outputs = run_variant(*load(args.model, args.n), args.child)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        print(json.dumps([pre, total, hashlib.sha256(repr(outputs).encode()).hexdigest()[:12], rss]))
        return
    chosen = {"all levers", *filter(None, args.only.split(","))}
    unknown = chosen - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    model, prompts, stops, pad = load(args.model, args.n, with_model=not args.first_call)  # children load their own
    samples: dict[str, list[tuple[float, float]]] = {}  # (prefill, decode) seconds of each run
    outputs: dict[str, object] = {}
    peak: dict[str, list[float]] = {}  # --first-call: each child's peak RSS, MB
    names = [name for name in VARIANTS if name in chosen]
    with torch.inference_mode():
        if not args.first_call:
            timed_decode(model, prompts[:4], stops, pad)  # warm-up: first-call allocations and kernel selection
        for repeat in range(args.repeats):
            # Every other repeat runs the variants in reverse: on a drifting machine a fixed order can favour one
            # slot of a round, so each variant takes each slot.
            for name in names if repeat % 2 == 0 else names[::-1]:
                if args.first_call:
                    pre, total, outputs[name], rss = first_call(name, args.model, args.n)
                    peak.setdefault(name, []).append(rss)
                else:
                    pre, total, outputs[name] = run_variant(model, prompts, stops, pad, name)
                samples.setdefault(name, []).append((pre, total - pre))
    n = len(prompts)
    mode = "each run a fresh process's first decode" if args.first_call else "warm, in one process"
    print(f"{machine_line()}; {n} dialogues, mean prompt {sum(map(len, prompts)) / n:.0f} tokens, 60 new tokens; "
          f"{mode}, best of {args.repeats}")
    # Each part's best is taken on its own: the run with the best total can carry a slow prefill, and the prefill
    # is the same code in most variants, so its noise would otherwise leak into the decode column.
    print("| variant | prefill s/dialogue | decode s/dialogue | total s/dialogue | total vs all levers "
          "| decode vs all levers | same outputs |" + (" peak RSS MB (each process) |" if peak else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if peak else ""))
    best = {name: (min(p for p, _ in runs), min(d for _, d in runs), min(p + d for p, d in runs))
            for name, runs in samples.items()}
    _, base_decode, base_total = best["all levers"]
    for name, (pre, dec, total) in best.items():
        same = "yes" if outputs[name] == outputs["all levers"] else "no"
        rss = f" {' '.join(f'{r:.0f}' for r in peak[name])} |" if peak else ""
        print(f"| {name} | {pre / n:.3f} | {dec / n:.3f} | {total / n:.3f} | {total / base_total:.2f}x "
              f"| {dec / base_decode:.2f}x | {same} |{rss}")


if __name__ == "__main__":
    main()
