"""QLoRA: LoRA over a frozen base that bitsandbytes quantizes to 4-bit NF4 (or FP4, or 8-bit) while it loads.

The base is quantized layer by layer as its weights are read, so the full-precision linear weights never sit in
memory together. LoRA's matrices stay in full precision and are the only weights that train. Embeddings, norms and
the LM head are not quantized (bitsandbytes replaces linear layers only). `peftlab merge` of a QLoRA run loads the
base in full precision and merges the adapter there, so the merged model is a plain fp32 model.

bitsandbytes runs on CUDA and, from 0.46.1 on, on the CPU. Where it cannot run, `quantized_placement` raises
`NotSupported` naming what is missing, and a study lists the run as not run.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version

import torch

from peftlab.core.errors import NotSupported, PeftlabError

QUANT_MODES = ("nf4", "fp4", "int8")
MIN_BITSANDBYTES = "0.46.1"  # the first release with a CPU backend for 4-bit layers (and transformers' minimum)


def check_available(device: torch.device) -> None:
    """Raise `NotSupported` naming the missing piece when bitsandbytes cannot quantize on `device`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NotSupported(
            "method qlora needs bitsandbytes, which is not installed; run: pip install 'peftlab[qlora]'"
        )
    from packaging.version import Version

    installed = version("bitsandbytes")
    if Version(installed) < Version(MIN_BITSANDBYTES):
        raise NotSupported(
            f"method qlora needs bitsandbytes >= {MIN_BITSANDBYTES} (found {installed}); "
            "run: pip install -U 'peftlab[qlora]'"
        )
    import bitsandbytes

    devices = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if device.type not in devices:
        raise NotSupported(
            f"method qlora: bitsandbytes {installed} has no backend for device '{device.type}' "
            f"(it supports {', '.join(sorted(devices))}); set model.device to one of those"
        )


def quantized_placement(mode: str, device: torch.device, compute_dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments that quantize the linear layers while loading and place the model on `device`."""
    if mode not in QUANT_MODES:
        raise PeftlabError(f"method.quant must be one of {', '.join(QUANT_MODES)}, got '{mode}'")
    check_available(device)
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        # The compute dtype is the model's: fp32 on the CPU, bf16 on a GPU, as for every other method.
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": config, "device_map": {"": str(device)}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether bitsandbytes quantized the model's linear layers when it loaded."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def require_quantized(loaded) -> None:
    """QLoRA trains only over a quantized base; a full-precision base here means the entry point did not load one."""
    if not is_quantized(loaded.model):
        raise PeftlabError(
            f"method qlora needs {loaded.name} loaded quantized, but it was loaded in full precision "
            "(peftlab train and compare load it so; multi-task mixtures do not support qlora)"
        )
    keep_trainable_on_cpu(loaded.model)


def keep_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, which breaks training that follows it.

    bitsandbytes 0.50 repacks a 4-bit weight into a faster CPU inference layout the first time the layer runs in
    eval mode, and keeps that layout when training resumes: the gradient to the layer's input is then lost (and a
    layer with a bias fails outright). The validation between epochs would silently cut the gradient flowing to
    earlier layers, so QLoRA runs keep the trainable layout throughout (inference is a little slower).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def stored_params(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a 4-bit tensor packs two weights into each stored byte."""
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()
