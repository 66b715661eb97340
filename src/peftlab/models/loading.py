"""`load_model`: a packaged name or a local folder to a `LoadedModel` on a device and dtype, quantized or
vision-language where the folder says so, with the windowed last layer installed.
"""

from __future__ import annotations

import warnings

import torch

from peftlab.kernels.lastlayer import window
from peftlab.models.device import default_dtype, pick_device
from peftlab.models.forward import _pad_aware_positions
from peftlab.models.hf_folder import LoadedModel, _check_weights_are_safe, from_local, load_tokenizer, model_kind
from peftlab.models.packaged import DEFAULT_MODEL, resolve_model_dir
from peftlab.models.quant import quantized_placement
from peftlab.models.vision_models import is_vision_language, load_vision_model


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
    holding a vision-language model loads with its processor (see `peftlab.models.vision_models`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 2-second "Loading weights" bar is noise next to peftlab's own bars
    # peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: two lines of
    # warning that the user cannot act on, in front of every adapter command's output or one-line error.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    if quantize:  # checked before any weight is read: a missing bitsandbytes fails fast, naming what to install

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
