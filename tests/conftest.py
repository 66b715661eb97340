"""Shared fixtures: tiny random models built from configs, offline, loaded through peftlab's real loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import DIALOGSUM, PUBMEDQA, build_tiny_causal, build_tiny_seq2seq


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 600-token BPE tokenizer and a chat template."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> Path:
    """A 2-layer T5 with a 600-token BPE tokenizer."""
    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["causal", "seq2seq"])
def tiny_model(request, tiny_causal, tiny_seq2seq) -> Path:
    return tiny_causal if request.param == "causal" else tiny_seq2seq


@pytest.fixture
def small_pubmedqa(tmp_path) -> Path:
    """The first 40 PubMedQA items, as a file in the original format."""
    items = dict(list(json.loads(PUBMEDQA.read_text()).items())[:40])
    out = tmp_path / "pubmedqa.json"
    out.write_text(json.dumps(items))
    return out


@pytest.fixture
def small_dialogsum(tmp_path) -> Path:
    out = tmp_path / "dialogsum.jsonl"
    out.write_text("\n".join(DIALOGSUM.read_text().splitlines()[:40]) + "\n")
    return out


@pytest.fixture
def peftlab_home(tmp_path, monkeypatch) -> Path:
    """An empty model cache, so no test depends on (or pollutes) the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("PEFTLAB_HOME", str(home))
    return home
