"""The decode KV cache and the attention that reads it (`peftlab.evaluate.decode`'s decode steps).

A decode step computes one query per row, so its attention does little but stream the cache from memory: for 64
DialogSum rows, 30 MB a layer, more than the layer's weights. Three things here keep that stream short and fast:

- **`BufferLayer`**: each layer's cache is one buffer sized once for the longest possible sequence, written in
  place (the default cache concatenates, copying the whole cache at every step). Left padding is zeroed only where
  an attention group will read it, and finished rows leave by moving the kept ones up in place, so memory that
  holds nothing is never touched: a left-padded batch of DialogSum prompts is about half padding;
- **`grouped_sdpa`**: the batch is left-padded to its longest prompt, so attention runs per group of length-sorted
  rows, each over only the columns some row of the group has filled;
- **`single_query_attention`**: on an AVX2 CPU, each group's attention is two GEMMs shaped for one query per row,
  with the cache as the streaming side (`research/decode_microbench.py`; decoding 3-6% faster on a Zen 3). On an
  AVX-512 CPU SDPA's own kernel is the faster one, and runs instead (`group_attention`, bench/RESULTS.md).

Keys stored transposed, (rows, heads, head size, columns), read 2.0 against 2.5 ms a layer in a microbenchmark of
this attention as two batched matmuls, but whole decoding was no faster (0.170 against 0.160 s per dialogue): each
step's new key is then a strided write into every row. bench/RESULTS.md has the row.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

DECODE_GROUPS = 8  # decode attention runs in up to this many groups of length-sorted rows (see grouped_sdpa)
KV_CACHE_BYTES = 2 * 1024**3  # the decode cache one generation batch may fill (see kv_cache_tokens)


class BufferLayer(DynamicLayer):
    """A KV-cache layer that writes into a preallocated buffer instead of concatenating at every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def allocate(self, rows: int, like: torch.Tensor) -> None:
        """Size the buffer for `rows` rows of `like`'s heads and head size. Left uninitialised, and left-padding
        columns stay so until attention is about to read them (`expose`): memory never written is never paged in,
        and a left-padded batch is about half padding."""
        _, h, _, d = like.shape
        self.device, self.is_initialized = like.device, True
        self.buf_k = like.new_empty(rows, h, self.capacity, d)
        self.buf_v = like.new_empty(rows, h, self.capacity, d)
        self.first = [self.capacity] * rows  # per row, the first column that holds a finite value

    def _refresh(self) -> None:
        self.keys, self.values = self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length]

    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Prefill: put one prompt's (heads, length, head size) keys and values in buffer row `row`, ending at column
        `width`. The columns left of the prompt are not touched."""
        col = width - keys.shape[-2]
        self.buf_k[row, :, col:width] = keys
        self.buf_v[row, :, col:width] = values
        self.first[row] = col
        self.length = width
        self._refresh()

    def expose(self, row: int, col: int) -> None:
        """Make row `row` readable from column `col` on: zero what lies left of its first finite column.

        Those columns are masked, but a stale non-finite value there would still turn a masked score into NaN, and
        NaN times a zero softmax weight is NaN."""
        if col < self.first[row]:
            self.buf_k[row, :, col : self.first[row]].zero_()
            self.buf_v[row, :, col : self.first[row]].zero_()
            self.first[row] = col

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.allocate(key_states.shape[0], key_states)
        if self.length == 0:  # every row is written from column 0
            self.first = [0] * key_states.shape[0]
        end = self.length + key_states.shape[-2]
        self.buf_k[:, :, self.length : end] = key_states
        self.buf_v[:, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`, in that order.

        Finished rows leaving (`indices` increasing) move the kept rows up in place, each over only the columns
        it holds, so compaction needs no second cache-sized buffer; any other order gathers into new buffers.
        """
        if not self.is_initialized:
            return
        keep, held = indices.tolist(), self.first
        if all(a < b for a, b in zip(keep, keep[1:], strict=False)):
            self.first = []
            for new, old in enumerate(keep):
                a = held[old]
                if new != old:
                    self.buf_k[new, :, a : self.length] = self.buf_k[old, :, a : self.length]
                    self.buf_v[new, :, a : self.length] = self.buf_v[old, :, a : self.length]
                    a = min(a, held[new])  # what row `new` held further left is still finite, if no longer its own
                self.first.append(a)
            self.buf_k, self.buf_v = self.buf_k[: len(keep)], self.buf_v[: len(keep)]
        else:
            self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
            self.first = [held[i] for i in keep]
        self._refresh()


def expose(cache, groups: list[tuple[int, int, int]]) -> None:
    """Zero, in every `BufferLayer` of `cache`, the columns each row's attention group reads but the row does not
    hold (`row_groups`: (first row, end row, first column))."""
    for layer in cache.layers:
        for start, end, col in groups:
            for row in range(start, end):
                layer.expose(row, col)


def kv_cache_tokens(model, budget_bytes: int = KV_CACHE_BYTES) -> int:
    """How many cached tokens (rows x width) fit in `budget_bytes` of keys and values for this model.

    A byte budget, not a fixed token count: SmolLM2-135M caches 45 KB per token (30 layers x 3 key/value heads x 64
    x 2 x fp32), so 2 GB holds 64 dialogues of 500-token prompts in one batch; a fixed 32k tokens split them into a
    batch of 63 and one of a single row, whose 60 weight-bound steps cost 4% of the whole run.
    """
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    return max(budget_bytes // per_token, 1)


GROUPED_ATTENTION = "peftlab_grouped_sdpa"


def row_groups(lengths: torch.Tensor, width: int, n_groups: int | None = None) -> list[tuple[int, int, int]]:
    """Split the rows into up to `n_groups` (default `DECODE_GROUPS`) consecutive groups of near-equal size; each
    keeps the cache columns from its longest prompt's first token on."""
    n_groups = min(n_groups or DECODE_GROUPS, len(lengths))
    bounds = torch.linspace(0, len(lengths), n_groups + 1).round().long().tolist()
    return [(a, b, width - int(lengths[a:b].max())) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def single_query_attention(module, query, key, value, mask, scaling=None, dropout=0.0, **kwargs):
    """A decode step's attention on the CPU, softmax(q k^T) v as SDPA computes it, in two GEMMs for one query a row.

    Each key/value head serves `g` query heads, so a row's scores for one head are a (columns x g) product.
    Computed as keys @ queries^T, the long cached operand streams through the GEMM as it is: about 19-24 GB/s,
    where SDPA's CPU kernel reads the whole attention's cache at 10-12 (`research/decode_microbench.py`).
    Anything else (a mask per head, dropout, soft-capped logits, another device) goes to SDPA unchanged.
    """
    n, heads, q_len, d = query.shape
    kv = key.shape[1]
    if (query.device.type != "cpu" or q_len != 1 or heads % kv or dropout or kwargs.get("softcap")
            or (mask is not None and mask.shape[1] != 1)):
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)[0]
    q = query.view(n, kv, heads // kv, d)
    scores = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2).contiguous()  # (n, kv, g, columns)
    scores.mul_(d**-0.5 if scaling is None else scaling)
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    out = torch.matmul(scores.softmax(-1), value)  # (n, kv, g, d)
    return out.view(n, 1, heads, d)  # (rows, query length, heads, head size), as sdpa_attention_forward returns


def grouped_sdpa(module, query, key, value, attention_mask, row_groups=None, **kwargs):
    """SDPA over groups of rows, each group over only the cache columns that hold some of its rows' tokens.

    `row_groups` is a list of (first row, end row, first column). The left-padded cache is as wide as the batch's
    longest prompt, and a decode step's attention does little but read that cache, so the columns that are padding
    for every row of a group are worth skipping. They are masked anyway, so their softmax weight is exactly zero
    and the rows' results stay the same. Without `row_groups` (prefill, training) this is plain SDPA.
    """
    if row_groups is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for start, end, first in row_groups:
        mask = attention_mask
        if mask is not None:
            mask = (mask if mask.shape[0] == 1 else mask[start:end])[..., first:]
        outputs.append(GROUP_ATTENTION(module, query[start:end], key[start:end, :, first:],
                                       value[start:end, :, first:], mask, **kwargs))
    return torch.cat(outputs), None


def sdpa_kernel_attention(module, query, key, value, mask, **kwargs):
    """A row group's decode attention through transformers' SDPA path (on a CPU, SDPA's flash kernel)."""
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]


def group_attention(capability: str):
    """The faster decode attention for a CPU whose torch kernels use `capability` (`get_cpu_capability()`).

    Measured side by side (`research/decode_levers.py`, same outputs both ways): on an AVX2 Zen 3 the two GEMMs of
    `single_query_attention` decoded 3-6% faster than SDPA's kernel; on an AVX-512 Xeon SDPA's kernel decoded 7%
    faster (0.184 against 0.198 s per dialogue), its vectorised softmax and reduction outrunning the GEMM pair.
    """
    return sdpa_kernel_attention if capability == "AVX512" else single_query_attention


# Each row group's decode attention (research/decode_levers.py swaps it).
GROUP_ATTENTION = group_attention(torch.backends.cpu.get_cpu_capability())


def decode_mask(**kwargs) -> torch.Tensor | None:
    """A decode step's padding mask: transformers' eager mask, 0 where a row attends, the dtype's minimum where not.

    SDPA turns a boolean mask into such floats in every call, so a boolean mask would be converted once per layer
    and row group (240 times a step for SmolLM2's 30 layers and 8 groups), where this builds it once a step. A
    masked column's softmax weight is exactly 0 either way: its exponent underflows as surely as that of -inf.
    """
    return eager_mask(**kwargs)


AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa)
AttentionMaskInterface.register(GROUPED_ATTENTION, decode_mask)
