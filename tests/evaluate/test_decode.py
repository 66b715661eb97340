"""The fast greedy decoder picks exactly the tokens `model.generate` picks, one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from builders import DIALOGSUM

from peftlab.data.tasks import get_task
from peftlab.evaluate.decode import greedy_decode
from peftlab.evaluate.generation import _decodes_fast, generate
from peftlab.kernels.shared_prefix import SharedPrefix
from peftlab.models.loading import load_model
from peftlab.prompts.batches import budget_groups
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat


@pytest.fixture(scope="module")
def sharp(tiny_causal):
    """The tiny Llama with large weights, so that its greedy outputs depend on the prompt."""
    loaded = load_model(str(tiny_causal), device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    loaded.model.eval()
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    task = get_task("dialogsum")
    items = [encode(task, ex, fmt, 110 + 23 * i) for i, ex in enumerate(task.load(DIALOGSUM)[:8])]
    prompts = sorted((e.prompt_ids for e in items), key=len)
    assert len({len(p) for p in prompts}) > 4
    return loaded, fmt, items, prompts


def _reference(model, prompts, max_new, stops, pad):
    """One unpadded `model.generate` per prompt, stop token cut off: the loop a user writes."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, num_beams=1, eos_token_id=list(stops), pad_token_id=pad)[0, len(p) :]
        toks = new.tolist()
        outs.append(next((toks[:i] for i, t in enumerate(toks) if t in stops), toks))
    return outs


def test_greedy_decode_equals_generate_with_rows_stopping_at_different_steps(sharp):
    loaded, fmt, _, prompts = sharp
    pad = fmt.tokenizer.pad_token_id
    free = _reference(loaded.model, prompts, 14, set(), pad)
    # Stop on a token that some rows emit early and others late or never, so rows leave the batch at different steps.
    stop = free[0][3]
    stop_steps = {next((i for i, t in enumerate(f) if t == stop), None) for f in free}
    assert len(stop_steps) > 2, stop_steps
    expected = _reference(loaded.model, prompts, 14, {stop}, pad)
    # A small prefill budget forces several prefill groups, merged into one decode batch.
    assert len(budget_groups([len(p) for p in prompts], 400)) > 2
    got = greedy_decode(loaded.model, prompts, 14, [stop], pad, prefill_tokens=400)
    assert got == expected
    assert greedy_decode(loaded.model, prompts, 14, [stop], pad) == expected  # one group


def test_generate_uses_the_fast_path_for_lora_and_keeps_generate_for_prompt_tuning(sharp):
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    loaded, fmt, items, _ = sharp
    lora = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    task_type=TaskType.CAUSAL_LM, init_lora_weights=False))
    assert _decodes_fast(lora, fmt, items)
    fast = generate(lora, fmt, items, max_new_tokens=10, progress=False)
    single = [generate(lora, fmt, [e], max_new_tokens=10, max_rows=1, progress=False)[0] for e in items]
    assert fast == single and len(set(fast)) > 1
    lora.unload()
    prompt = get_peft_model(loaded.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    assert not _decodes_fast(prompt, fmt, items)
    assert len(generate(prompt, fmt, items[:2], max_new_tokens=4, progress=False)) == 2


VARIANTS = ["right-padded-prefill", "left-padded-prefill", "idle-rows", "attention-groups-3",
            "attention-whole-cache", "head-in-slices"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_prefill_and_compaction_variant_equals_generate(sharp, monkeypatch, variant):
    """The unmasked right-padded prefill, the masked left-padded one (for models without per-row logit positions),
    rows that finish but stay in the batch for a while and the sliced LM head all pick the tokens `generate` picks."""
    import peftlab.evaluate.decode as decode
    import peftlab.kernels.kvcache as kvcache

    loaded, fmt, _, prompts = sharp
    pad = fmt.tokenizer.pad_token_id
    assert decode.takes_unmasked_rows(loaded.model)
    if variant == "left-padded-prefill":
        monkeypatch.setattr(decode, "takes_unmasked_rows", lambda model: False)
    if variant == "idle-rows":  # finished rows leave only when all have finished
        monkeypatch.setattr(decode, "COMPACT_FRACTION", 1)
    if variant.startswith("attention-"):  # groups of several rows cropped to their longest; or one uncropped group
        monkeypatch.setattr(kvcache, "DECODE_GROUPS", 3 if variant == "attention-groups-3" else 1)
    if variant == "head-in-slices":  # the tiny vocabulary in uneven slices, the last one short
        monkeypatch.setattr(decode, "HEAD_COLUMNS", 97)
    stop = _reference(loaded.model, prompts, 14, set(), pad)[0][3]
    expected = _reference(loaded.model, prompts, 14, {stop}, pad)
    assert greedy_decode(loaded.model, prompts, 14, [stop], pad, prefill_tokens=400) == expected


def test_row_groups_keep_each_groups_longest_prompt():
    from peftlab.kernels.kvcache import row_groups

    lengths = torch.tensor([3, 5, 6, 9, 10, 20])
    assert row_groups(lengths, 20, 3) == [(0, 2, 15), (2, 4, 11), (4, 6, 0)]
    assert row_groups(lengths[:2], 20, 8) == [(0, 1, 17), (1, 2, 15)]


def test_decode_attention_runs_cropped_groups_and_restores_sdpa(sharp, monkeypatch):
    """The decode steps really take the grouped path (keys narrower than the cache), and the model is left on SDPA."""
    import peftlab.kernels.kvcache as kvcache

    loaded, fmt, _, prompts = sharp
    widths = []
    plain = kvcache.GROUP_ATTENTION

    def spy(module, query, key, *args, **kwargs):
        widths.append(key.shape[2])
        return plain(module, query, key, *args, **kwargs)

    monkeypatch.setattr(kvcache, "GROUP_ATTENTION", spy)
    greedy_decode(loaded.model, prompts, 3, [], fmt.tokenizer.pad_token_id)
    longest = max(len(p) for p in prompts)
    assert min(widths) <= len(prompts[0]) + 2 < longest  # the shortest prompt's group skips the others' columns
    assert loaded.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_single_query_attention_equals_sdpa(mask_kind):
    """One query per row, 9 query heads over 3 key/value heads, left padding masked: the two-GEMM form gives SDPA's
    output, in SDPA's output layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from peftlab.kernels.kvcache import single_query_attention

    class Attention:
        num_key_value_groups, is_causal, training = 3, True, False

    torch.manual_seed(0)
    rows, columns = 5, 23
    query = torch.randn(rows, 9, 1, 16)
    key, value = torch.randn(rows, 3, columns, 16), torch.randn(rows, 3, columns, 16)
    attend = torch.arange(columns)[None] >= torch.tensor([0, 4, 9, 15, 22])[:, None]  # each row's left padding
    mask = {"bool": attend[:, None, None], "none": None,
            "additive": torch.zeros(rows, 1, 1, columns).masked_fill(~attend[:, None, None], float("-inf"))}[mask_kind]
    want, _ = sdpa_attention_forward(Attention(), query, key, value, mask, scaling=0.3, dropout=0.0)
    got = single_query_attention(Attention(), query, key, value, mask, scaling=0.3, dropout=0.0)
    assert got.shape == want.shape == (rows, 1, 9, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decode_attention_is_chosen_by_the_cpus_vector_width():
    """Two GEMMs on AVX2, SDPA's kernel on AVX-512 (bench/RESULTS.md); both return SDPA's output layout."""
    from peftlab.kernels.kvcache import group_attention, sdpa_kernel_attention, single_query_attention

    assert group_attention("AVX2") is single_query_attention
    assert group_attention("DEFAULT") is single_query_attention
    assert group_attention("AVX512") is sdpa_kernel_attention

    class Attention:
        num_key_value_groups, is_causal, training = 3, True, False

    query, key, value = torch.randn(4, 9, 1, 16), torch.randn(4, 3, 11, 16), torch.randn(4, 3, 11, 16)
    torch.testing.assert_close(sdpa_kernel_attention(Attention(), query, key, value, None, dropout=0.0),
                               single_query_attention(Attention(), query, key, value, None, dropout=0.0))


def test_kv_cache_tokens_is_a_byte_budget(sharp):
    from peftlab.kernels.kvcache import kv_cache_tokens

    model = sharp[0].model
    cfg = model.config  # tiny Llama: 2 key/value heads of hidden/heads each, fp32
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert kv_cache_tokens(model, 10 * per_token) == 10
    assert kv_cache_tokens(model) == 2 * 1024**3 // per_token


def test_prompts_shared_opening_runs_once_and_changes_no_token(sharp, monkeypatch):
    import peftlab.evaluate.decode as decode
    from peftlab.kernels.shared_prefix import opening_length

    loaded, fmt, _, prompts = sharp
    pad = fmt.tokenizer.pad_token_id
    opening = list(range(20, 32))  # 12 tokens every prompt starts with, as a system turn would be
    with_opening = [opening + p for p in prompts]
    assert opening_length(with_opening) >= len(opening)
    built = []
    monkeypatch.setattr(decode, "SharedPrefix", lambda *a: built.append(a[1]) or SharedPrefix(*a))
    expected = _reference(loaded.model, with_opening, 10, set(), pad)
    assert greedy_decode(loaded.model, with_opening, 10, [], pad, prefill_tokens=400) == expected
    assert len(built) == 1 and list(built[0][: len(opening)]) == opening


@pytest.mark.parametrize("keep", [[0, 2, 3, 6], [1, 2, 3, 4, 5, 6, 7], [0, 1, 2], [5, 1, 3]])
def test_cache_compaction_keeps_the_chosen_rows_in_order(keep):
    from peftlab.kernels.kvcache import BufferLayer

    layer = BufferLayer(capacity=6)
    keys, values = torch.randn(8, 2, 4, 3), torch.randn(8, 2, 4, 3)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor(keep))
    torch.testing.assert_close(layer.keys, keys[keep], rtol=0, atol=0)
    torch.testing.assert_close(layer.values, values[keep], rtol=0, atol=0)
    layer.update(torch.ones(len(keep), 2, 1, 3), torch.zeros(len(keep), 2, 1, 3))  # decoding goes on after it
    assert layer.keys.shape == (len(keep), 2, 5, 3) and bool((layer.keys[:, :, 4] == 1).all())


def test_head_in_column_slices_gives_the_same_logits_and_is_restored(sharp):
    from peftlab.evaluate.decode import column_blocks

    model = sharp[0].model
    head = model.get_output_embeddings()
    ids = torch.tensor([sharp[3][0][:40], sharp[3][1][:40]])
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        whole = model(input_ids=ids).logits
        with column_blocks(model, width=97):
            assert "forward" in vars(head)
            sliced = model(input_ids=ids).logits
    assert "forward" not in vars(head) and len(calls) == 2
    head._forward_hooks.clear()
    assert head.out_features % 97 != 0
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)


def test_prefill_rows_land_right_aligned_with_their_padding_left_until_exposed():
    from peftlab.kernels.kvcache import BufferLayer

    layer = BufferLayer(capacity=9)
    layer.allocate(4, torch.empty(1, 2, 1, 3))
    layer.buf_k.fill_(float("nan"))  # what a reused allocation may hold
    layer.buf_v.fill_(float("nan"))
    keys, values = torch.randn(2, 2, 6, 3), torch.randn(2, 2, 6, 3)
    layer.write_row(2, keys[0, :, :5], values[0, :, :5], width=7)
    layer.write_row(3, keys[1, :, 2:6], values[1, :, 2:6], width=7)
    torch.testing.assert_close(layer.keys[2, :, 2:], keys[0, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(layer.values[3, :, 3:], values[1, :, 2:6], rtol=0, atol=0)
    assert layer.keys.shape == (4, 2, 7, 3) and layer.keys[2, :, :2].isnan().all()  # padding not touched
    layer.expose(2, 1)
    layer.expose(3, 0)
    assert bool((layer.keys[2, :, 1:2] == 0).all()) and layer.keys[2, :, :1].isnan().all()
    assert bool((layer.values[3, :, :3] == 0).all()) and not layer.keys[3].isnan().any()
    torch.testing.assert_close(layer.keys[2, :, 2:], keys[0, :, :5], rtol=0, atol=0)


def test_in_place_compaction_keeps_what_each_row_can_be_read_from():
    from peftlab.kernels.kvcache import BufferLayer

    layer = BufferLayer(capacity=8)
    layer.allocate(3, torch.empty(1, 1, 1, 2))
    layer.buf_k.fill_(float("nan"))
    layer.buf_v.fill_(float("nan"))
    rows = [torch.randn(1, n, 2) for n in (2, 5, 3)]
    for i, r in enumerate(rows):
        layer.write_row(i, r, r, width=6)
    layer.batch_select_indices(torch.tensor([1, 2]))  # row 0 leaves: 1 -> 0 and 2 -> 1, moved in place
    # Row 0 now holds the 5-token row: finite from column 1. Row 1 holds the 3-token row from column 3 on, and left
    # of it the moved-away row's columns 1-2, stale but finite: exposing it from column 1 zeroes nothing.
    assert layer.first == [1, 1]
    torch.testing.assert_close(layer.keys[0, :, 1:], rows[1], rtol=0, atol=0)
    torch.testing.assert_close(layer.keys[1, :, 3:], rows[2], rtol=0, atol=0)
    layer.expose(1, 0)
    layer.expose(0, 0)
    assert not layer.keys.isnan().any() and not layer.values.isnan().any()


@pytest.mark.parametrize("n_groups", [1, 3])
def test_greedy_decode_reads_no_unwritten_cache_memory(sharp, monkeypatch, n_groups):
    """Buffers that start as NaN (as reused memory may) change no token: every column read was written or zeroed."""
    import peftlab.kernels.kvcache as kvcache
    from peftlab.kernels.kvcache import BufferLayer

    monkeypatch.setattr(kvcache, "DECODE_GROUPS", n_groups)  # groups of rows of different lengths read padding

    loaded, fmt, _, prompts = sharp
    pad = fmt.tokenizer.pad_token_id
    allocate = BufferLayer.allocate

    def poisoned(self, rows, like):
        allocate(self, rows, like)
        self.buf_k.fill_(float("nan"))
        self.buf_v.fill_(float("nan"))

    monkeypatch.setattr(BufferLayer, "allocate", poisoned)
    free = _reference(loaded.model, prompts, 12, set(), pad)
    stop = free[0][2]  # rows stop at different steps, so compaction moves rows up
    expected = _reference(loaded.model, prompts, 12, {stop}, pad)
    assert greedy_decode(loaded.model, prompts, 12, [stop], pad, prefill_tokens=400) == expected
