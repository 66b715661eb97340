"""One optimizer step's pieces: rows split under the token budget, and when the shared prefix may be used."""

from __future__ import annotations

import pytest
import torch

from peftlab.core.config import load_config
from peftlab.prompts.format import Encoded
from peftlab.train.step import micro_tokens, shares_prefix, split_rows


def test_split_rows_sorts_and_keeps_each_piece_under_the_budget():
    items = [Encoded(str(i), [1] * n, [2] * 4) for i, n in enumerate([300, 20, 150, 90, 600])]
    pieces = split_rows(items, [0, 1, 2, 3, 4], 512)
    assert sorted(i for p in pieces for i in p) == [0, 1, 2, 3, 4]
    flat = [i for p in pieces for i in p]
    assert [items[i].length for i in flat] == sorted(items[i].length for i in flat)
    for piece in pieces:  # padded tokens: rows x the longest; a single row may exceed the budget on its own
        assert len(piece) == 1 or len(piece) * max(items[i].length for i in piece) <= 512
    assert split_rows(items, [4, 0], 0) == [[4, 0]]  # 0: never split


@pytest.mark.parametrize("overrides,right,world,expected", [
    ([], True, 1, True),
    (["train.shared_prefix=false"], True, 1, False),
    ([], False, 1, False),  # left-padded layouts (prompt learning, vision-language models)
    ([], True, 2, False),  # data-parallel: the prefix's backward would come after the all-reduce
    (["train.activation_checkpointing=selective"], True, 1, False),  # transformers turns the KV cache off
])
def test_shares_prefix_only_where_it_is_exact(overrides, right, world, expected):
    assert shares_prefix(load_config(None, overrides), right, world) is expected


def test_shared_prefix_default_depends_on_the_device():
    cfg = load_config(None, [])
    assert shares_prefix(cfg, True, 1, "cpu") is True
    assert shares_prefix(cfg, True, 1, torch.device("cuda")) is False  # one more pass of launches on a GPU
    assert shares_prefix(load_config(None, ["train.shared_prefix=true"]), True, 1, "cuda") is True  # set wins


def test_micro_tokens_default_depends_on_the_device():
    assert micro_tokens(None, "cpu") == 512  # pieces that keep a layer's activations in cache
    assert micro_tokens(None, torch.device("cuda")) == 0  # a GPU takes each batch whole
    assert micro_tokens(256, "cuda") == 256 and micro_tokens(0, "cpu") == 0  # a set value always wins
