"""Is greedy decoding faster with `peftlab.core.allocator.reuse_freed_memory` than without? Side by side, one command.

    .venv/bin/python -m research.allocator_levers --n 64 --pairs 2 --repeats 2

The allocator setting holds for a whole process, so each side runs in child processes of its own, alternating
(off, on, then on, off, ...) so that a drift of the machine's speed falls on both. Each child loads the model,
then times `evaluate.generate` on the same n DialogSum prompts (60 new tokens) and the prefill alone
(`decode._prefill`), `--repeats` times each. Prints each side's best and mean seconds per dialogue, their ratios,
and whether every run produced the same text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time


def child(on: bool, n: int, repeats: int) -> dict:
    """One side's timings, in this process."""
    if on:
        from peftlab.core.allocator import reuse_freed_memory

        assert reuse_freed_memory(), "mallopt refused the settings"
    import torch

    import peftlab.evaluate.decode as decode
    from peftlab.bench.common import encode_dialogsum
    from peftlab.evaluate.generation import generate
    from peftlab.models.loading import load_model
    from peftlab.prompts.batches import forward_tokens

    fmt, items, _ = encode_dialogsum("smollm2-135m-instruct", n, 1024)
    model = load_model("smollm2-135m-instruct").model.eval()
    prompts = sorted((e.prompt_ids for e in items), key=len)
    capacity = len(prompts[-1]) + 60  # the cache's width when decoding 60 new tokens
    run = (model, prompts, fmt.tokenizer.pad_token_id, capacity, forward_tokens("cpu"), torch.device("cpu"))
    totals, prefills, digests = [], [], set()
    for _ in range(repeats):
        t0 = time.perf_counter()
        texts = generate(model, fmt, items, 60, progress=False)
        totals.append((time.perf_counter() - t0) / n)
        digests.add(hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12])
        with torch.inference_mode(), decode.column_blocks(model):
            t0 = time.perf_counter()
            decode._prefill(*run)
            prefills.append((time.perf_counter() - t0) / n)
    return {"on": on, "total": totals, "prefill": prefills, "digests": sorted(digests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.n, args.repeats)))
        return

    from peftlab.bench.common import machine_line

    runs = {True: [], False: []}
    for pair in range(args.pairs):
        for on in ((False, True) if pair % 2 == 0 else (True, False)):
            cmd = [sys.executable, "-m", __spec__.name, "--child", "on" if on else "off", "--n", str(args.n),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[on].append(json.loads(out.strip().splitlines()[-1]))
            last = runs[on][-1]
            print(f"pair {pair + 1} {'on ' if on else 'off'}: total " + " ".join(f"{t:.3f}" for t in last["total"])
                  + ", prefill " + " ".join(f"{t:.3f}" for t in last["prefill"]), flush=True)
    print(machine_line())
    print(f"n={args.n}, 60 new tokens, {args.pairs} processes a side, {args.repeats} runs each; s per dialogue\n")
    print("| part | default malloc best (mean) | reuse_freed_memory best (mean) | ratio of bests |")
    print("|---|---|---|---|")
    for part in ("total", "prefill"):
        off = [t for r in runs[False] for t in r[part]]
        on = [t for r in runs[True] for t in r[part]]
        print(f"| {part} | {min(off):.3f} ({sum(off) / len(off):.3f}) | {min(on):.3f} ({sum(on) / len(on):.3f}) "
              f"| {min(on) / min(off):.3f} |")
    digests = {d for side in runs.values() for r in side for d in r["digests"]}
    print(f"\nthe same texts in every run: {len(digests) == 1}")


if __name__ == "__main__":
    main()
