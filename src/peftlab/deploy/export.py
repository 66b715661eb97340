"""Merging a trained adapter into its base, and exporting the merged model as GGUF for llama.cpp and Ollama.

`merge_run` folds an adapter into the base weights (`merge_and_unload`) and saves a plain transformers folder, so
the result loads anywhere without peft. Every tuner that changes weights merges (LoRA and its variants, IA3, VeRA,
LoHa, LoKr, OFT, BOFT, HRA, FourierFT, MiSS, SHiRA, HiRA, LN-tuning, ...); one whose peft layer has no merge gets
a one-line refusal with peft's reason. `export_gguf` writes that merged model as a llama-architecture
GGUF file with `gguf.GGUFWriter`, the writer llama.cpp's own converter uses; only llama-family causal models
(SmolLM2 is one) are supported. Prompt-learning adapters (prompt, prefix, P-tuning) add virtual tokens rather than
changing weights, so they cannot be merged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from peftlab.core.config import read_run_config
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_file_writable, ensure_writable, save_reason
from peftlab.models.adapters import load_adapter, read_adapter_config
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.loading import load_model

# Adapter kinds that are not weights to fold in: virtual tokens (prompt learning) and adaption prompts.
UNMERGEABLE = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")


def merged_model(run_dir: str | Path) -> LoadedModel:
    """The run's base model with its adapter merged in, in fp32 on the CPU (a full fine-tune's model as is)."""

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise PeftlabError(f"{run}: not a peftlab run folder (no config.yaml)")
    if (run / "model" / "config.json").exists():  # full fine-tuning saved a whole model: nothing to merge
        return load_model(str(run / "model"), device="cpu", dtype=torch.float32)
    adapter_dir = run / "adapter"
    if not (adapter_dir / "adapter_config.json").exists():
        raise PeftlabError(f"{run}: the run saved no adapter (zero- and few-shot runs train nothing to merge)")
    peft_type = read_adapter_config(adapter_dir)["peft_type"]  # an unknown type is refused here, by name
    if peft_type in UNMERGEABLE:
        raise PeftlabError(
            f"{run}: a {peft_type} adapter adds virtual tokens instead of changing weights, so it cannot be "
            "merged (serve it with `peftlab serve` instead)"
        )
    cfg = read_run_config(run / "config.yaml")
    # fp32 on the CPU: merging adds a low-rank product to every adapted weight, and bf16 would round it away.
    loaded = load_model(cfg.model.name, device="cpu", dtype=torch.float32, allow_pickle=cfg.model.allow_pickle)
    try:
        loaded.model = load_adapter(loaded, adapter_dir).merge_and_unload()
    except (NotImplementedError, AttributeError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PeftlabError(f"{run}: a {peft_type} adapter cannot be merged by peft ({reason}); serve it with "
                           "`peftlab serve` instead") from None
    loaded.model.eval()
    return loaded


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    """Merge the run's adapter into its base and save a standard transformers folder (safetensors + tokenizer)."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # iterdir below would say only "Not a directory"
        raise PeftlabError(f"{out}: is a file; --out names the folder to save the merged model in")
    if out.exists() and any(out.iterdir()):
        raise PeftlabError(f"{out} already exists and is not empty; choose another --out or delete it")
    ensure_writable(out, "choose another --out")  # before the merge, not after it
    loaded = merged_model(run_dir)
    # The packaged model's converted cache records that it came from a GGUF file; a merged folder is plain
    # safetensors, and vLLM would misread that note as a quantization method.
    if getattr(loaded.model.config, "quantization_config", None) is not None:
        del loaded.model.config.quantization_config
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        (loaded.processor or loaded.tokenizer).save_pretrained(tmp)  # a VLM's processor includes its tokenizer
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)  # a half-written model folder must never look complete
    except (OSError, SafetensorError) as err:
        raise PeftlabError(f"{out}: cannot save the merged model ({save_reason(err)}); nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_gguf(run_dir: str | Path, out_file: str | Path, f16: bool = False) -> Path:
    """Merge the run's adapter and write the model as a GGUF file (F32, or F16 matrices with `f16`)."""
    ensure_file_writable(out_file, "--gguf", "model.gguf")  # before the merge, not after it
    loaded = merged_model(run_dir)
    return write_gguf(loaded, Path(out_file), f16=f16, name=Path(run_dir).resolve().name)


def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama" or getattr(config, "is_encoder_decoder", False):
        raise PeftlabError(
            f"GGUF export supports llama-family causal models (like SmolLM2), not '{config.model_type}'; "
            "use `peftlab merge` and llama.cpp's convert_hf_to_gguf.py for other architectures"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PeftlabError(f"GGUF export does not support RoPE scaling '{rope.get('rope_type')}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise PeftlabError("GGUF export does not support llama models with attention or MLP biases")


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved-pair layout.

    This is llama.cpp's `LlamaModel.permute`; transformers' GGUF loader applies the inverse
    (`LlamaTensorProcessor._reverse_permute_weights`) when reading the file back.
    """
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(loaded: LoadedModel, out: Path, f16: bool = False, name: str = "model") -> Path:
    """Write a llama-architecture GGUF file: hyperparameters, byte-level BPE tokenizer, and tensors."""
    import gguf

    config = loaded.model.config
    _check_llama(config)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as err:
        raise PeftlabError(f"{out}: cannot write here ({save_reason(err)}); choose another --gguf") from None
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
        _add_hparams(writer, config)
        _add_tokenizer(writer, loaded.tokenizer, config.vocab_size)
        _add_tensors(writer, loaded.model, config, f16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as err:
        raise PeftlabError(f"{out}: cannot write the GGUF file ({save_reason(err)}); nothing was written") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _add_hparams(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's 'gpt2' (byte-level BPE) model: tokens, types, merges, special ids, template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise PeftlabError("GGUF export supports byte-level BPE tokenizers only (like SmolLM2's and Llama 3's)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise PeftlabError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp's filler for embedding rows with no token
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    # SmolLM2's original tokenizer splits digits one by one (llama.cpp calls that 'smollm'); a tokenizer without
    # that rule is plain GPT-2 splitting, named 'gpt-2' there ('gpt2' fails to load as an unknown pre-tokenizer).
    # Either way the file tokenizes as the tokenizer peftlab trained with.
    writer.add_tokenizer_pre(
        "smollm" if '"individual_digits": true' in json.dumps(spec.get("pre_tokenizer")) else "gpt-2"
    )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensors(writer, model: torch.nn.Module, config, f16: bool) -> None:
    """Every weight under llama.cpp's name, q/k permuted; 1-D norms stay F32 as llama.cpp requires."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PeftlabError(f"GGUF export: no llama.cpp name for tensor '{key}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_permute(data, heads)
        elif name.endswith("attn_k.weight"):
            data = llama_permute(data, kv_heads)
        writer.add_tensor(name, data.astype(np.float16) if f16 and data.ndim > 1 else data)
