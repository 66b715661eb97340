"""Loading trained adapters onto a base model, safely.

An adapter trained on another base would load with silently wrong shapes or meaning, so the adapter's recorded
base and its tensor shapes are checked against the loaded base first, and the error names both. Its
adapter_config.json is checked before that: a peft_type the installed peft does not know would otherwise surface as
a KeyError from peft or as a misfit with the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from peftlab.core.errors import PeftlabError
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.loading import load_model


def find_adapter_dir(path: str | Path) -> Path:
    """Accept a peft folder or a run folder holding `adapter/`."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    raise PeftlabError(f"{p}: no adapter_config.json here or in {p / 'adapter'}")


def read_adapter_config(adapter_dir: Path) -> dict:
    """The folder's adapter_config.json, refused in one line unless it is a JSON object whose peft_type the
    installed peft knows (peft names it exactly, in capitals: 'LORA', 'IA3', ...)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:  # ValueError: malformed JSON or text that is not UTF-8
        raise PeftlabError(f"{path}: not a readable JSON adapter config ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise PeftlabError(f"{path}: expected a JSON object (an adapter config), got a {type(config).__name__}")
    known = ", ".join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))
    if "peft_type" not in config:
        raise PeftlabError(f"{path}: no peft_type field; known: {known}")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise PeftlabError(f"{path}: unknown peft_type {peft_type!r}; known: {known}")
    return config


def check_adapter_base(adapter_dir: Path, loaded: LoadedModel) -> None:
    """Refuse an adapter whose config is unreadable or of an unknown type, or whose base model or tensor shapes
    differ from the loaded base."""
    config = read_adapter_config(adapter_dir)
    recorded = config.get("base_model_name_or_path") or ""
    # A 4-bit weight is stored packed; its quant_state keeps the shape the adapter was trained against.
    base_shapes = {name: tuple(getattr(getattr(p, "quant_state", None), "shape", p.shape))
                   for name, p in loaded.model.named_parameters()}
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise PeftlabError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapters are not loaded)")
    hidden = getattr(loaded.model.config, "hidden_size", None) or getattr(loaded.model.config, "d_model", None)
    for key, shape in _tensor_shapes(weights).items():
        if not _shape_fits(key, shape, base_shapes, hidden):
            raise PeftlabError(
                f"adapter {adapter_dir} was trained on base '{recorded}' and does not fit base "
                f"'{loaded.name}' ({loaded.path}): tensor {key} has shape {shape}"
            )


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, reading each tensor whole so a cut-off file is caught here."""
    try:
        with safe_open(weights, "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            for key in shapes:
                f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise PeftlabError(
            f"{weights}: not a readable safetensors file ({str(err).splitlines()[0]}); "
            "the save may have been cut off: train the run again"
        ) from None
    return shapes


def _shape_fits(key: str, shape: tuple, base_shapes: dict, hidden: int | None) -> bool:
    if "lora_A" in key or "lora_B" in key:
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        base = next(
            (
                s
                for n, s in base_shapes.items()
                if n.endswith(module + ".weight") or n.endswith(module + ".base_layer.weight")
            ),
            None,
        )
        if base is None:
            return False
        return shape[1] == base[1] if "lora_A" in key else shape[0] == base[0]
    if key.endswith("prompt_embeddings") or key == "prompt_embeddings":
        return hidden is None or shape[-1] == hidden or shape[-1] % hidden == 0
    return True


def load_adapter(loaded: LoadedModel, path: str | Path, adapter_name: str = "default") -> torch.nn.Module:
    """Wrap the base with a saved peft adapter after checking it fits."""
    from peft import PeftModel

    adapter_dir = find_adapter_dir(path)
    check_adapter_base(adapter_dir, loaded)
    try:
        return PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise PeftlabError(
            f"adapter {adapter_dir} does not fit base '{loaded.name}': {str(err).splitlines()[0]}"
        ) from None


def load_for_inference(model: str, adapter: str | None, device: str = "auto", allow_pickle: bool = False):
    """The base model, with a saved adapter applied if given (a full fine-tune's run folder is a model itself)."""

    if adapter and (Path(adapter) / "model" / "config.json").exists():
        return load_model(str(Path(adapter) / "model"), device=device, allow_pickle=allow_pickle), None
    loaded = load_model(model, device=device, allow_pickle=allow_pickle)
    if adapter:
        loaded.model = load_adapter(loaded, adapter)
    return loaded, adapter
