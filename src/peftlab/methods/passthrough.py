"""Any peft tuner as a method: `method.name: peft` with `method.peft: {peft_type: ..., ...}` or a saved
`method.peft_config` (an adapter_config.json), and `method.peft` fields added to a named method's config.

`peft_fields` reads the saved config and checks the fields against the installed peft's config class; a study
calls it (`check_peft`) when its configs load, so a misspelt field stops it before any run trains. Here the fields
become the config itself. `task_type` follows the model kind, and `target_modules` given with Llama names map to
T5's (q_proj -> q) as they do for the named methods.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peftlab.core.config import MethodConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import Task
from peftlab.methods.tuners import peft_task_type, target_names
from peftlab.methods.variants import ADALORA_PLACEHOLDER_STEPS
from peftlab.models.hf_folder import LoadedModel

# What a saved adapter_config.json records about its origin, not how the tuner is built; peftlab sets task_type.
_PEFT_RECORD_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


def check_peft(cfg: MethodConfig) -> None:
    """Check `method.peft` and `method.peft_config` where the method uses them (raises `PeftlabError`)."""
    if cfg.peft or cfg.peft_config or cfg.name == "peft":
        peft_fields(cfg)


def peft_fields(cfg: MethodConfig) -> tuple[str | None, dict]:
    """(peft type, fields) from `peft_config` then `peft`, checked against the installed peft's config class.

    The type is None when neither names one: the fields then go onto a named method's own config. Fields a
    saved config records about where it came from (base model, inference mode, peft version) are dropped.
    """
    fields: dict = {}
    where = "method.peft"
    if cfg.peft_config:
        fields, where = _read_peft_config(Path(cfg.peft_config)), cfg.peft_config
    fields = {k: v for k, v in {**fields, **cfg.peft}.items() if k not in _PEFT_RECORD_FIELDS}
    peft_type = fields.pop("peft_type", None)
    if cfg.name == "peft" and peft_type is None:
        raise PeftlabError("method.name peft needs method.peft.peft_type (e.g. VERA) or method.peft_config")
    if peft_type is None:
        return None, fields
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = str(peft_type).upper().replace("-", "_")
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
        valid = ", ".join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))
        raise PeftlabError(f"{_shown(where)}: unknown peft_type {peft_type!r}; valid: {valid}")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[key]
    if cfg.peft_config:
        # A file saved by another peft version carries that version's fields; one this peft lacks, left at an
        # empty or false default, configures nothing and is dropped. A set one is still an error.
        names = {f.name for f in dataclasses.fields(config_class)} | set(cfg.peft)
        fields = {k: v for k, v in fields.items() if k in names or v}
    check_peft_fields(config_class, fields, where)
    return key, fields


def _shown(text: Any) -> str:
    """User text inside a one-line error: a newline in a key or path is shown escaped, not printed."""
    return repr(str(text))[1:-1]


def _read_peft_config(path: Path) -> dict:
    path = path / "adapter_config.json" if path.is_dir() else path
    if not path.is_file():
        raise PeftlabError(f"{_shown(path)}: no such peft config (method.peft_config)")
    try:
        fields = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise PeftlabError(f"{_shown(path)}: not a readable JSON peft config ({str(err).splitlines()[0]})") from None
    if not isinstance(fields, dict) or "peft_type" not in fields:
        raise PeftlabError(f"{_shown(path)}: a peft config is a JSON object with a peft_type")
    return fields


def check_peft_fields(config_class: type, fields: dict, where: str) -> None:
    """An unknown field of `config_class` is an error naming it, like an unknown config key."""
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    for key in fields:
        if key not in names:
            key, where = _shown(key), _shown(where)
            what = f"config key '{where}.{key}'" if where.startswith("method.") else f"field '{key}' in {where}"
            raise PeftlabError(f"unknown {what} for {config_class.__name__}; valid: {', '.join(sorted(names))}")


def _resolved(fields: dict, cfg: MethodConfig, loaded: LoadedModel, where: str) -> dict:
    """The fields with task_type from the model kind and list-valued target_modules resolved for the model."""
    task_type = peft_task_type(loaded)
    given = fields.get("task_type")
    if given is not None and str(getattr(given, "value", given)).upper() != task_type.value:
        raise PeftlabError(f"{where}.task_type is {given} but {loaded.name} is a {loaded.kind} model "
                           f"({task_type.value}); leave task_type out and peftlab fills it in")
    out = {**fields, "task_type": task_type}
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = target_names(dataclasses.replace(cfg, target_modules=out["target_modules"]),
                                                loaded)
    return out


def _construct(config_class: type, fields: dict, where: str):
    try:
        return config_class(**fields)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PeftlabError(f"{where}: peft rejects these {config_class.__name__} fields: {first}") from None


def any_tuner(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.name: peft`: the peft config that `method.peft_config` and `method.peft` describe."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type, fields = peft_fields(cfg)
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = _resolved(fields, cfg, loaded, "method.peft")
    if peft_type == "ADALORA" and fields.get("total_step") is None:
        fields["total_step"] = ADALORA_PLACEHOLDER_STEPS  # the loop puts the run's count in (methods.schedule)
    return _construct(config_class, fields, cfg.peft_config or "method.peft")


def with_extras(config, cfg: MethodConfig, loaded: LoadedModel):
    """A named method's peft config with the `method.peft` fields on top (checked against its config class)."""
    peft_type, fields = peft_fields(cfg)
    if peft_type is not None and peft_type != config.peft_type.value:
        raise PeftlabError(f"method.peft.peft_type is {peft_type}, but method '{cfg.name}' is a "
                           f"{config.peft_type.value} tuner; drop peft_type or use method.name peft")
    if not fields:
        return config
    check_peft_fields(type(config), fields, "method.peft")
    merged = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    merged.pop("peft_type", None)
    return _construct(type(config), _resolved({**merged, **fields}, cfg, loaded, "method.peft"), "method.peft")
