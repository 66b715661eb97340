"""Any peft tuner as a method: `method.name: peft` with `method.peft: {peft_type: ..., ...}` or a saved
`method.peft_config` (an adapter_config.json), and `method.peft` fields added to a named method's config.

The fields were checked against the installed peft's config class when the run config loaded
(`MethodConfig.peft_fields`); here they become the config itself. `task_type` follows the model kind, and
`target_modules` given with Llama names map to T5's (q_proj -> q) as they do for the named methods.
"""

from __future__ import annotations

import dataclasses

from peftlab.core.config import MethodConfig, check_peft_fields
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import Task
from peftlab.methods.tuners import peft_task_type, target_names
from peftlab.methods.variants import ADALORA_PLACEHOLDER_STEPS
from peftlab.models.hf_folder import LoadedModel


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

    peft_type, fields = cfg.peft_fields()
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = _resolved(fields, cfg, loaded, "method.peft")
    if peft_type == "ADALORA" and fields.get("total_step") is None:
        fields["total_step"] = ADALORA_PLACEHOLDER_STEPS  # the loop puts the run's count in (methods.schedule)
    return _construct(config_class, fields, cfg.peft_config or "method.peft")


def with_extras(config, cfg: MethodConfig, loaded: LoadedModel):
    """A named method's peft config with the `method.peft` fields on top (checked against its config class)."""
    peft_type, fields = cfg.peft_fields()
    if peft_type is not None and peft_type != config.peft_type.value:
        raise PeftlabError(f"method.peft.peft_type is {peft_type}, but method '{cfg.name}' is a "
                           f"{config.peft_type.value} tuner; drop peft_type or use method.name peft")
    if not fields:
        return config
    check_peft_fields(type(config), fields, "method.peft")
    merged = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    merged.pop("peft_type", None)
    return _construct(type(config), _resolved({**merged, **fields}, cfg, loaded, "method.peft"), "method.peft")
