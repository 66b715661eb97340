"""Shared fixtures: tiny random models built from configs, offline, loaded through peftlab's real loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from builders import DIALOGSUM, PUBMEDQA, build_tiny_causal, build_tiny_seq2seq
from hypothesis import settings

# Property tests: `ci` (the default, on every clone and in CI) draws the same inputs every run and keeps no example
# database, so `make test` passes or fails the same way everywhere. `dev` is the long randomized hunt a developer runs
# on purpose: HYPOTHESIS_PROFILE=dev pytest tests/data/test_loaders_fuzz.py tests/core/test_config_fuzz.py
settings.register_profile("ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True)
settings.register_profile("dev", derandomize=False, max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# `train.mixed_precision: auto` measures bf16 against fp32 on the CPU it runs on (train.measured_precision), and
# the CPUs this project runs on differ. The suite trains in fp32 everywhere, so that it gives the same numbers on
# every machine; tests/train/test_measured_precision.py turns the measurement on. Subprocesses inherit this.
os.environ.setdefault("PEFTLAB_AUTO_PRECISION", "fp32")
# The shared frozen-base pass is kept in each process only, so no test reads values another test (or the user's
# own studies) stored under PEFTLAB_HOME; tests/methods/test_frozen_pass.py turns the store on.
os.environ.setdefault("PEFTLAB_FROZEN_CACHE", "off")


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 600-token BPE tokenizer and a chat template."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_causal_untied(tmp_path_factory) -> Path:
    """tiny_causal with untied input and output embeddings. Its greedy text varies, where the tied one repeats the
    prompt's last token (a chat prompt's is a newline, so its answers are blank): for tests that need visible text."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False, seed=1)


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_causal, tmp_path_factory) -> Path:
    """A finished one-step LoRA run folder on tiny_causal (PubMedQA). Shared: copy it before changing it."""
    from peftlab.core.config import load_config
    from peftlab.recipes.train_run import run_training

    root = tmp_path_factory.mktemp("lora-run")
    data = root / "pubmedqa.json"
    data.write_text(json.dumps(dict(list(json.loads(PUBMEDQA.read_text()).items())[:20])))
    return run_training(load_config(None, [f"model.name={tiny_causal}", "model.device=cpu", "method.name=lora",
                                           f"data.path={data}", "data.limit_train=4", "data.limit_eval=2",
                                           "data.max_length=128", "train.max_steps=1", f"output_dir={root}",
                                           "name=lora"]))


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
    return _first_pubmedqa(tmp_path)


@pytest.fixture(scope="module")
def small_pubmedqa_module(tmp_path_factory) -> Path:
    """small_pubmedqa for a module's shared fixtures (a study run once and compared against)."""
    return _first_pubmedqa(tmp_path_factory.mktemp("pubmedqa"))


def _first_pubmedqa(folder: Path, n: int = 40) -> Path:
    items = dict(list(json.loads(PUBMEDQA.read_text()).items())[:n])
    out = folder / "pubmedqa.json"
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
