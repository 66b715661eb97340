"""One frozen-base pass per prompt, shared by the methods that read the base without changing it.

Zero-shot, few-shot and the linear head all run the same frozen model over prompts. So do their selection
candidates (shots, `head_c`), their seeds and their folds, and every rerun of a study. Each used to run its own
forward pass. Here one pass over a prompt yields everything they read:

- the log-probabilities of the labels' first tokens after the prompt (zero-shot and few-shot scoring);
- the prompt's hidden states after every decoder layer, mean-pooled over its tokens (the linear head's features).

Both are stored by model and prompt in `$PEFTLAB_HOME/frozen-passes.sqlite`, so they are shared within a study,
across its worker processes and across studies on the same model, data and prompt. SQLite takes concurrent
writers from several workers; the first value written for a key stays (`INSERT OR IGNORE`). A store that cannot
be opened (a read-only or network home) is a one-line warning, and the run keeps its passes in memory.

**Bit-identity.** A CPU GEMM rounds a row differently with the batch around it (measured on SmolLM2: label
log-probs moved by up to 3e-5 when the same prompt sat in another batch). So a pass computes its missing prompts in
the batches `label_scores` always used, and the key names the model by its weights' bytes. Where two methods score
the same list of prompts (zero-shot's and the head's test fold, a head's selection points, a rerun), the shared
value is bit-identical to a separate pass (tests/methods/test_frozen_pass.py). Where a prompt meets other prompts
(a k-fold head's training features, a full run after a `limit_eval` run), it carries the rounding of the batch
that first computed it, as the head's in-process feature cache always did across folds.

**Size.** Every layer's pooled states take `layers x hidden x 4` bytes a prompt (69 KB for SmolLM2-135M), on disk
and, for the prompts of one pass, in memory. Delete the file to clear it. `PEFTLAB_FROZEN_CACHE=off` keeps the
passes in the process only (the head's folds still share them there).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from tqdm.auto import tqdm

from peftlab.models.packaged import peftlab_home
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.format import Encoded

STORE_FILE = "frozen-passes.sqlite"
MAX_ROWS = 64  # rows per batch: the scoring batches, so a shared value equals a separate pass's


class _Reached(Exception):
    """Raised by a forward hook once the last needed layer has run: the layers above cannot change its states."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder layers of a Llama-style causal LM (`model.model.layers`), or None."""
    return getattr(getattr(model, "model", None), "layers", None)


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of what a frozen pass's values depend on: the weights' bytes, dtypes and class, and torch.

    Hashing the weights (about 0.5 s for 135M parameters) rather than trusting a name is what lets two runs, or a
    local folder rewritten in place, never share values that came from other weights. Memoised on the model.
    """
    cached = getattr(model, "_peftlab_fingerprint", None)
    if cached is not None:
        return cached
    # What computes the values besides the weights: the model's class and config (heads, norm eps, attention), the
    # device and the versions whose forward it runs.
    config = model.config.to_json_string() if hasattr(model, "config") else ""
    device = next(model.parameters()).device.type
    code = f"{type(model).__name__} {device} torch {torch.__version__} transformers {transformers.__version__}"
    digest = hashlib.blake2b(f"{code} {config}".encode(), digest_size=20)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    model._peftlab_fingerprint = digest.hexdigest()
    return model._peftlab_fingerprint


class _Memory:
    """The in-process store: what `PEFTLAB_FROZEN_CACHE=off` leaves."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], bytes] = {}

    def get(self, keys: Sequence[str], field_name: str) -> dict[str, bytes]:
        return {k: self.values[(k, field_name)] for k in keys if (k, field_name) in self.values}

    def put(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        for k, f, v in rows:
            self.values.setdefault((k, f), v)  # the first value written stays, as in the SQLite store


class _Sqlite:
    """The shared store: one row per (prompt key, field), WAL mode so workers read while one writes."""

    def __init__(self, path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS pass (key TEXT, field TEXT, value BLOB, PRIMARY KEY (key, field))")

    def get(self, keys: Sequence[str], field_name: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for i in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT key, value FROM pass WHERE field = ? AND key IN ({marks})"
            out.update(self.db.execute(sql, [field_name, *chunk]).fetchall())
        return out

    def put(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")  # one transaction (one sync) for the whole pass, not one per row
        try:
            self.db.executemany("INSERT OR IGNORE INTO pass VALUES (?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


_STORES: dict[str, _Memory | _Sqlite] = {}


def _store() -> _Memory | _Sqlite:
    """This process's store: the SQLite file under `$PEFTLAB_HOME`, or memory when the cache is off."""
    if os.environ.get("PEFTLAB_FROZEN_CACHE", "on").lower() in ("off", "0", "no"):
        return _STORES.setdefault("memory", _Memory())
    path = peftlab_home() / STORE_FILE
    if str(path) not in _STORES:
        try:
            _STORES[str(path)] = _Sqlite(path)
        except (OSError, sqlite3.Error) as err:
            print(f"warning: {path}: cannot keep frozen-base passes there ({err}); this run keeps them in memory "
                  "(set PEFTLAB_HOME to a writable local folder to share them)", file=sys.stderr)
            _STORES[str(path)] = _Memory()
    return _STORES[str(path)]


@dataclass
class PassStats:
    """How many prompts a run's frozen passes needed, and how many came from the store (`result.json`)."""

    prompts: int = 0
    from_store: int = 0

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "from_store": self.from_store}


STATS = PassStats()  # this process's count; a run resets it at its start (`reset_stats`)


def reset_stats() -> PassStats:
    """Start counting a new run's frozen passes; returns the counter."""
    STATS.prompts = STATS.from_store = 0
    return STATS


def _prompt_key(model_digest: str, prompt_ids: Sequence[int]) -> str:
    # A pass under bf16 autocast (`train.mixed_precision: auto` may score in bf16) computes other values.
    mode = " ".join(f"{d} {torch.get_autocast_dtype(d)}" for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    ids = torch.tensor(list(prompt_ids), dtype=torch.int64).numpy().tobytes()
    return hashlib.blake2b(f"{model_digest} {mode}".encode() + ids, digest_size=20).hexdigest()


def label_field(candidates: Sequence[Sequence[int]]) -> str:
    """The store field of label scores: each label's scored token ids."""
    return "labels " + ";".join(" ".join(map(str, ids)) for ids in candidates)


def pooled_field(layer: int) -> str:
    """The store field of the mean-pooled hidden states after decoder layer `layer` (1-based)."""
    return f"pooled {layer}"


Compute = Callable[[list[Encoded]], dict[str, torch.Tensor]]


def stored_rows(model: torch.nn.Module, items: Sequence[Encoded], wanted: str, compute: Compute) -> torch.Tensor:
    """Field `wanted` of every item's frozen-base pass, (len(items), width): read from the store where it is.

    The items not found go to `compute` together, in their order, so they meet the batches a separate pass would
    have given them. `compute` returns {field: (len(missing), width)} with at least `wanted`; every field it returns
    is stored (a scoring pass also returns each layer's pooled states, for a linear head to read later).
    """
    digest = fingerprint(model)
    keys = [_prompt_key(digest, e.prompt_ids) for e in items]
    store = _store()
    found = store.get(keys, wanted)
    todo = [i for i, k in enumerate(keys) if k not in found]
    STATS.prompts += len(keys)
    STATS.from_store += len(keys) - len(todo)
    if todo:
        computed = compute([items[i] for i in todo])
        rows = [(keys[i], name, values[row].contiguous().numpy().tobytes())
                for name, values in computed.items() for row, i in enumerate(todo)]
        try:
            store.put(rows)
        except (OSError, sqlite3.Error) as err:  # a full disk or a lock held past the timeout: this run goes on
            print(f"warning: frozen-base passes not stored ({err})", file=sys.stderr)
        found.update({keys[i]: computed[wanted][row].contiguous().numpy().tobytes() for row, i in enumerate(todo)})
    return torch.stack([torch.frombuffer(bytearray(found[k]), dtype=torch.float32) for k in keys])


@torch.inference_mode()
def prompt_pass(model, items: Sequence[Encoded], pad_id: int, max_tokens: int, label_ids: Sequence[int] | None = None,
                last_layer: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """One forward over the prompts (no target tokens), in the batches label scoring uses.

    Returns the pooled states after layers 1..`last_layer` (every layer when `label_ids` are given) and, with
    `label_ids` (one token per label), the log-probabilities of those tokens right after each prompt.
    """
    layers = decoder_layers(model)
    last = len(layers) if label_ids is not None else last_layer  # with no logits wanted, stop at the last layer
    device = next(model.parameters()).device
    probe = [Encoded(e.id, e.prompt_ids, [0]) for e in items]  # target [0]: the input is the prompt alone
    out = {pooled_field(j + 1): torch.zeros(len(items), model.config.hidden_size) for j in range(last)}
    if label_ids is not None:
        out[label_field([[i] for i in label_ids])] = torch.zeros(len(items), len(label_ids))
    bar = tqdm(total=len(items), desc="frozen pass", unit="ex", disable=not progress, leave=False)
    for idx in token_batches(probe, max_tokens, max_rows=MAX_ROWS):
        batch = {k: v.to(device) for k, v in collate([probe[i] for i in idx], "causal", pad_id).items()}
        pooled, logprobs = _forward(model, layers[:last], batch, label_ids is not None)
        for j, states in enumerate(pooled):
            out[pooled_field(j + 1)][idx] = states.cpu()
        if logprobs is not None:
            out[label_field([[i] for i in label_ids])][idx] = logprobs[:, list(label_ids)].cpu()
        bar.update(len(idx))
    bar.close()
    return out


def pooled_states(model, layers, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last of `layers`' output, mean-pooled over the attention mask; the forward stops there."""
    return _forward(model, layers, batch, logits=False)[0][-1]


def _forward(model, layers, batch: dict[str, torch.Tensor], logits: bool):
    """Each of `layers`' outputs mean-pooled over the mask, and the last position's log-softmax if `logits`
    (else the forward stops after the last of `layers`)."""
    pooled: list[torch.Tensor] = []

    def pool(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        if not logits and len(pooled) == len(layers):
            raise _Reached

    handles = [layer.register_forward_hook(pool) for layer in layers]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    except _Reached:
        return pooled, None
    finally:
        for handle in handles:
            handle.remove()
    return pooled, out.logits[:, -1].float().log_softmax(-1)
