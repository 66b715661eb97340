"""Loading base models: kind and chat detection, the pickle guard, unknown names and the device choice."""

from __future__ import annotations

import shutil

import pytest
import torch

from peftlab.core.errors import PeftlabError
from peftlab.models.device import parse_dtype, pick_device
from peftlab.models.loading import load_model


def test_tiny_causal_loads_as_causal_chat(tiny_causal):
    loaded = load_model(str(tiny_causal), device="cpu")
    assert loaded.kind == "causal"
    assert loaded.chat is True  # the tiny tokenizer carries a chat template
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.num_params > 0


def test_tiny_seq2seq_loads_as_seq2seq_without_chat(tiny_seq2seq):
    loaded = load_model(str(tiny_seq2seq), device="cpu")
    assert loaded.kind == "seq2seq"
    assert loaded.chat is False
    assert loaded.model.config.is_encoder_decoder


def test_chat_override_wins(tiny_causal):
    assert load_model(str(tiny_causal), device="cpu", chat=False).chat is False


@pytest.fixture
def pickled_model(tiny_causal, tmp_path):
    """The tiny causal model re-saved as pytorch_model.bin (a pickle) with no safetensors beside it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pickled"
    out.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    # transformers 5 no longer writes pickles (safe_serialization=False is ignored), so write the file by hand.
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    for f in tiny_causal.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    return out, model


def test_pickled_weights_refused_without_allow_pickle(pickled_model):
    path, _ = pickled_model
    with pytest.raises(PeftlabError, match="--allow-pickle") as err:
        load_model(str(path), device="cpu")
    assert "pytorch_model.bin" in str(err.value)


def test_pickled_weights_load_with_allow_pickle(pickled_model):
    path, original = pickled_model
    loaded = load_model(str(path), device="cpu", allow_pickle=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original(ids).logits, atol=1e-6)


def test_unknown_model_name_lists_packaged_models():
    with pytest.raises(PeftlabError, match="smollm2-135m-instruct") as err:
        load_model("no-such-model")
    assert "no-such-model" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(PeftlabError, match="config.json"):
        load_model(str(tmp_path))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert pick_device(None).type in ("cpu", "mps")


def test_dtype_from_config_name(tiny_causal):
    assert parse_dtype("auto") is None
    loaded = load_model(str(tiny_causal), device="cpu", dtype=parse_dtype("bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(PeftlabError, match="float32"):
        parse_dtype("fp8")
