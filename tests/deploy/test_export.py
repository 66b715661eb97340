"""`peftlab merge` and `peftlab export`: the merged model and the GGUF file compute what the adapter computes."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import PUBMEDQA, build_tiny_causal

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.deploy.export import export_gguf, llama_permute, merge_run, merged_model, write_gguf
from peftlab.models.adapters import load_adapter
from peftlab.models.loading import load_model
from peftlab.recipes.train_run import run_training

PROMPTS = ["Does aspirin reduce pain?", "Is smoking linked to cancer?", "yes no maybe", "Hello there", "Summarise:"]


def _train_lora(model: Path, root: Path, name: str) -> Path:
    data = root / "pubmedqa.json"
    data.write_text(json.dumps(dict(list(json.loads(PUBMEDQA.read_text()).items())[:20])))
    overrides = [
        f"model.name={model}",
        "model.device=cpu",
        "method.name=lora",
        "method.target_modules=all-linear",  # q and k too, so the GGUF q/k permutation is exercised on merged weights
        f"data.path={data}",
        "data.limit_train=8",
        "data.limit_eval=2",
        "data.max_length=192",
        "train.max_steps=3",
        "train.lr=0.5",  # a high rate moves LoRA's B away from zero in three steps
        f"output_dir={root}",
        f"name={name}",
    ]
    return run_training(load_config(None, overrides))


@pytest.fixture(scope="module")
def lora_run(tiny_causal, tmp_path_factory) -> Path:
    return _train_lora(tiny_causal, tmp_path_factory.mktemp("export-runs"), "lora")


def _inputs(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Does aspirin reduce pain in adults? yes no maybe").input_ids])


@torch.no_grad()
def test_merge_matches_unmerged(tiny_causal, lora_run, tmp_path):
    base = load_model(str(tiny_causal), device="cpu")
    ids = _inputs(base.tokenizer)
    base_logits = base.model(ids).logits
    adapted = load_adapter(base, lora_run / "adapter")
    adapted_logits = adapted(input_ids=ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changes the model

    out = merge_run(lora_run, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    merged = load_model(str(out), device="cpu")
    torch.testing.assert_close(merged.model(ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert merged.tokenizer("yes no").input_ids == base.tokenizer("yes no").input_ids


def test_merge_refusals(lora_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("taken")
    with pytest.raises(PeftlabError, match="not empty"):
        merge_run(lora_run, tmp_path / "full")
    prompt_run = shutil.copytree(lora_run, tmp_path / "prompt-run")
    config = json.loads((prompt_run / "adapter" / "adapter_config.json").read_text())
    (prompt_run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(PeftlabError, match="cannot be merged"):
        merge_run(prompt_run, tmp_path / "out")
    with pytest.raises(PeftlabError, match="not a peftlab run folder"):
        merged_model(tmp_path)


def _check_gguf(run: Path, gguf_path: Path, untied: bool) -> None:
    """Read the file back with gguf and transformers; logits and greedy tokens must match the merged model."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = merged_model(run)
    layers = ref.model.config.num_hidden_layers
    reader = gguf.GGUFReader(gguf_path)
    names = {t.name for t in reader.tensors}
    assert len(reader.tensors) == 2 + 9 * layers + untied  # embeddings, final norm, 9 per block, untied head
    assert ("output.weight" in names) == untied and "blk.1.attn_q.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.no_grad():
        ids = _inputs(ref.tokenizer)
        torch.testing.assert_close(loaded(ids).logits, ref.model(ids).logits, atol=1e-4, rtol=1e-4)
        for prompt in PROMPTS:
            assert tokenizer(prompt).input_ids == ref.tokenizer(prompt).input_ids
            ids = torch.tensor([ref.tokenizer(prompt).input_ids])
            kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": ref.tokenizer.pad_token_id}
            assert loaded.generate(ids, **kw).tolist() == ref.model.generate(ids, **kw).tolist()
    assert tokenizer.chat_template == ref.tokenizer.chat_template


def test_export_gguf_round_trip(lora_run, tmp_path):
    out = export_gguf(lora_run, tmp_path / "gguf" / "model.gguf")
    _check_gguf(lora_run, out, untied=False)


def test_export_gguf_untied_head(tmp_path):
    model = build_tiny_causal(tmp_path / "untied-model", tie=False, seed=1)
    run = _train_lora(model, tmp_path, "untied")
    _check_gguf(run, export_gguf(run, tmp_path / "gguf" / "untied.gguf"), untied=True)


def test_export_gguf_f16_holds_the_rounded_weights_and_is_smaller(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    f32 = export_gguf(lora_run, tmp_path / "f32.gguf")
    f16 = export_gguf(lora_run, tmp_path / "f16.gguf", f16=True)
    assert f16.stat().st_size < 0.75 * f32.stat().st_size
    ref = merged_model(lora_run)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f16.name, dtype=torch.float32)
    with torch.no_grad():
        ids = _inputs(ref.tokenizer)
        # The file must hold the merged weights rounded to f16 (matrices; norms stay f32), nothing else. How far
        # that rounding moves the logits depends on the trained weights, so the reference is rounded the same way.
        for p in ref.model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
        torch.testing.assert_close(loaded(ids).logits, ref.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_permute_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8 * 3, 4)  # 3 heads of dim 8
    permuted = llama_permute(weight, 3)
    assert not np.array_equal(permuted, weight)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, 3, 3)
    assert np.array_equal(undone, weight)


def test_export_refuses_non_llama(tiny_seq2seq, tmp_path):
    with pytest.raises(PeftlabError, match="llama-family"):
        write_gguf(load_model(str(tiny_seq2seq), device="cpu"), tmp_path / "t5.gguf")
    assert not (tmp_path / "t5.gguf").exists()


def test_gguf_runs_in_llama_cpp(lora_run, tmp_path):
    """llama.cpp loads the exported file and its greedy tokens match peftlab's merged model. `make test` builds
    llama-cpp-python, so in CI (CI set) a missing one fails; elsewhere the test skips without it."""
    llama_cpp = importlib.import_module("llama_cpp") if os.environ.get("CI") else pytest.importorskip("llama_cpp")
    out = export_gguf(lora_run, tmp_path / "model.gguf")
    ref = merged_model(lora_run)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False)
    for prompt in PROMPTS:
        ids = ref.tokenizer(prompt).input_ids
        with torch.no_grad():
            expected = ref.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            got.append(token)
            if len(got) == len(expected):
                break
        assert got == expected.tolist()
