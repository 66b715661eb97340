"""Run configuration: typed dataclasses read from YAML, with `section.key=value` overrides from the command line.

Every field has help text (`metadata["help"]`), unknown keys are errors that name the key, and the resolved
config is saved with each run so the run can be repeated exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_text_atomic
from peftlab.core.yamlio import YamlSyntaxError, describe, dump_yaml, parse_yaml, read_yaml

DEFAULT_MODEL = "smollm2-135m-instruct"  # the packaged SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized)


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f(DEFAULT_MODEL, "packaged model name (see `peftlab models`) or a local HF folder")
    device: str = _f("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "weights' dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, "
                            "float16")
    chat: bool | None = _f(None, "use the chat template; default: when the tokenizer has one")
    allow_pickle: bool = _f(False, "allow .bin/.pt pickled weights (they can run code when loaded)")


@dataclass
class DataConfig:
    task: str = _f("pubmedqa", "registered task name or path to a custom task YAML")
    path: str | None = _f(None, "data file; default: the task's file under data/")
    train: str | None = _f(None, "training file (JSONL, JSON, CSV or Parquet); replaces data.path")
    val: str | None = _f(None, "validation file; default: carved from data.train, seeded and stratified")
    test: str | None = _f(None, "test file; default: carved from data.train by data.split")
    labels: list[str] | None = _f(None, "alpaca/chat: the label set, which makes the task classification; default: "
                                        "found in the training outputs when they are a few short labels")
    split: list[float] = _f([0.8, 0.1, 0.1], "train/val/test fractions when the file has no split of its own")
    fold: int | None = _f(None, "k-fold cross-validation: which fold is the test split (with `folds`)")
    folds: int = _f(10, "number of folds for k-fold cross-validation")
    seed: int = _f(0, "seed of the split")
    template: int = _f(0, "index of the instruction phrasing")
    max_length: int = _f(512, "max tokens of prompt + target; the context is cut, never the question or target")
    too_long: str = _f("cut", "a row over data.max_length: cut (a chat loses its oldest turns first; a training row "
                              "that cannot fit even then is dropped and counted) or error (stop on it)")
    shots: int = _f(0, "in-context examples from the train split (few-shot)")
    calibrate: bool = _f(False, "classification: contextual calibration of the label scores (divide out the "
                                "prompt's own label bias, measured on content-free inputs); see evaluate.calibrate")
    limit_train: int | None = _f(None, "use only the first N training examples")
    limit_eval: int | None = _f(None, "score only the first N val and test examples")
    target: str = _f("gold", "training labels: gold, teacher, or a path to a JSONL/CSV of outputs keyed by id")
    mixture: list[dict] = _f(
        [], "multi-task mix: list of {task, path?, weight, templates: [idx...]}; replaces data.task when set"
    )


@dataclass
class MethodConfig:
    name: str = _f("lora", "a method from `peftlab methods` (lora, dora, vera, oft, ... full, zero-shot), or peft: "
                           "any peft tuner given by method.peft or method.peft_config")
    r: int = _f(8, "rank (LoRA and its variants, VeRA, LoHa, LoKr, AdaLoRA's target, HRA, MiSS, Lily, SHiRA, HiRA)")
    alpha: int = _f(16, "LoRA alpha (scale = alpha / r); also LoHa, LoKr and AdaLoRA")
    dropout: float = _f(0.05, "dropout on the adapter's input (LoRA and its variants, AdaLoRA, VeRA, MiSS, HiRA)")
    target_modules: list[str] | str = _f(["q_proj", "v_proj"], "modules to adapt (LoRA, IA3 and the other weight "
                                                               "tuners), or 'all-linear'")
    peft: dict = _f({}, "peft config fields: with method.name peft, any tuner ({peft_type: VERA, r: 256, ...}); "
                        "with a named method, fields added to its config (docs/methods.md)")
    peft_config: str | None = _f(None, "method.name peft: a saved peft config (adapter_config.json or its folder), "
                                       "e.g. an experiment of peft's method_comparison/; method.peft fields override")
    num_virtual_tokens: int = _f(20, "virtual tokens for prompt, prefix and P-tuning")
    prompt_init: str = _f("random", "prompt-tuning init: random, or text (the task's instruction)")
    prefix_projection: bool = _f(False, "prefix tuning: re-parameterise the prefix through an MLP")
    encoder_hidden_size: int = _f(128, "hidden size of the prefix / P-tuning prompt encoder MLP")
    head_layer: int = _f(16, "linear-head: decoder layer (1-based) whose mean-pooled hidden states feed the head")
    head_c: float = _f(0.1, "linear-head: inverse L2 strength of the logistic regression (smaller = stronger)")
    class_balance: float = _f(0.5, "linear-head: class weights (n / (k * count)) ** this; 1 balanced, 0 unweighted "
                                  "(gradient methods: train.class_balance)")
    head_text: list[str] = _f([], "linear-head: text feature sets (words, word-pairs, reported-statistics), each "
                                  "with its own regression, log-probabilities added to the hidden-state head's")
    quant: str = _f("nf4", "qlora: how bitsandbytes quantizes the frozen base: nf4, fp4 (4-bit) or int8 (8-bit)")
    vision: list[str] = _f([], "vision-language models: also adapt these parts: tower, projector (default: "
                               "the language model only)")

    def __post_init__(self) -> None:
        # Checked at config load, so a study stops on a misspelt peft field before any of its runs trains.
        if self.peft or self.peft_config or self.name == "peft":
            self.peft_fields()

    def peft_fields(self) -> tuple[str | None, dict]:
        """(peft type, fields) from `peft_config` then `peft`, checked against the installed peft's config class.

        The type is None when neither names one: the fields then go onto a named method's own config. Fields a
        saved config records about where it came from (base model, inference mode, peft version) are dropped.
        """
        fields: dict = {}
        where = "method.peft"
        if self.peft_config:
            fields, where = _read_peft_config(Path(self.peft_config)), self.peft_config
        if self.peft is not None and not isinstance(self.peft, dict):
            raise PeftlabError(f"method.peft: expected a mapping of peft config fields, got {self.peft!r}")
        fields = {k: v for k, v in {**fields, **(self.peft or {})}.items() if k not in _PEFT_RECORD_FIELDS}
        peft_type = fields.pop("peft_type", None)
        if self.name == "peft" and peft_type is None:
            raise PeftlabError("method.name peft needs method.peft.peft_type (e.g. VERA) or method.peft_config")
        if peft_type is None:
            return None, fields
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        key = str(peft_type).upper().replace("-", "_")
        if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
            valid = ", ".join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))
            raise PeftlabError(f"{_shown(where)}: unknown peft_type {peft_type!r}; valid: {valid}")
        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[key]
        if self.peft_config:
            # A file saved by another peft version carries that version's fields; one this peft lacks, left at an
            # empty or false default, configures nothing and is dropped. A set one is still an error.
            names = {f.name for f in dataclasses.fields(config_class)} | set(self.peft or {})
            fields = {k: v for k, v in fields.items() if k in names or v}
        check_peft_fields(config_class, fields, where)
        return key, fields


# What a saved adapter_config.json records about its origin, not how the tuner is built; peftlab sets task_type.
_PEFT_RECORD_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


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


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training split")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    lr: float | None = _f(None, "peak learning rate; default: the method's")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: str = _f("linear", "learning-rate schedule: linear, cosine or constant (all with warmup)")
    warmup_ratio: float = _f(0.06, "fraction of steps spent warming up")
    batch_size: int = _f(8, "max examples per batch")
    batch_tokens: int = _f(4096, "max padded tokens per batch (time scales with tokens, not rows)")
    micro_tokens: int | None = _f(None, "forward/backward a batch in pieces of at most this many padded tokens: "
                                        "the same gradients, activation memory bounded by the piece (0: never "
                                        "split); default: 512 on a CPU, whole batches on a GPU")
    grad_accum: int = _f(1, "batches per optimizer step")
    mixed_precision: str = _f("auto", "bf16 autocast over fp32 weights: auto (on a CPU: bf16 where a probe of the "
                                      "run's first batch measures it >= 1.2x fp32 with the same loss, cached per "
                                      "CPU; on a GPU: for full fine-tuning with model.dtype auto), no, bf16")
    shared_prefix: bool | None = _f(None, "run the prompt opening that all rows of a step share (system turn, "
                                          "fixed instruction) once per step instead of once per row: same gradients "
                                          "(with dropout, one mask for the opening per step), less work (single "
                                          "process, right-padded text rows, no activation checkpointing); default: "
                                          "on a CPU, off on a GPU (there it is one more pass of kernel launches)")
    class_balance: float = _f(0.0, "classification tasks: weight each example's loss by (n / (k * count of its "
                                   "class)) ** this; 0 unweighted, 1 fully balanced, 0.5 square-root weights")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 turns it off)")
    patience: int | None = _f(None, "early stopping: epochs without val-loss improvement before stopping")
    eval_every_epoch: bool = _f(True, "val loss and task metric after every epoch")
    seed: int = _f(0, "seed for init, shuffling and dropout")
    report_to: list[str] = _f([], "experiment trackers: tensorboard, mlflow")
    threads: int | None = _f(None, "torch CPU threads; default: all cores")
    checkpoint_every: int | None = _f(50, "save a resumable checkpoint every N optimizer steps (atomic)")
    resume: bool = _f(False, "continue from the run folder's checkpoint, if one exists")
    activation_checkpointing: bool | str = _f(
        False, "recompute activations in backward. 'selective': keep matmul and attention outputs, recompute the "
               "cheap elementwise ops (about half the activation memory for a few % more time); 'full' or true: "
               "keep only each layer's input (far less memory, about 1/3 more compute); false: keep everything")


@dataclass
class ExperimentsConfig:
    forgetting: list[str] = _f([], "other tasks to score before and after training (catastrophic forgetting)")
    forgetting_data: dict = _f({}, "data file per forgetting task; default: the task's file under data/")
    forgetting_limit: int = _f(50, "test examples scored per forgetting task")
    general_text: str | None = _f(None, "plain-text file for the general next-token loss; default with forgetting: "
                                        "data/general/general_text.txt")
    probe: bool = _f(False, "brittleness probe: perturb test prompts and measure how often predictions flip")
    probe_limit: int = _f(50, "test examples used by the brittleness probe")


@dataclass
class RunConfig:
    name: str = _f("run", "run name: the folder under output_dir")
    output_dir: str = _f("runs", "where run folders are written")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Check (and mildly coerce) a YAML value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check_value(where, value, arg)
            except PeftlabError as err:
                errors.append(str(err))
        raise PeftlabError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise PeftlabError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(where, v, item) for v in value]
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        _bad(where, value, tp)
    return value


def _bad(where: str, value: Any, tp: type) -> typing.NoReturn:
    raise PeftlabError(f"{where}: expected {tp.__name__}, got {value!r}")


def from_dict(cls: type, raw: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; an unknown key is an error that names it and the valid ones."""
    if not isinstance(raw, dict):
        raise PeftlabError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise PeftlabError(f"unknown config key {path!r}; valid: {', '.join(sorted(names))}")
        tp = hints[key]
        if _is_dataclass_type(tp):  # a section left empty (`train:` with its keys commented out) is the defaults
            kwargs[key] = from_dict(tp, {} if value is None else value, path)
        else:
            kwargs[key] = _check_value(path, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(raw: dict, key: str, value: Any, where: str | None = None) -> dict:
    """Set `value` at the dotted `key` (`train.lr`) of a nested dict, making the sections on the way.

    A section given as nothing (`train:` with every key commented out) is an empty one.
    """
    node, where = raw, where or f"'{key}'"
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise PeftlabError(f"{where}: '{part}' is not a section")
    node[leaf] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict; values are parsed as YAML 1.2 (3e-4, true, no, [q_proj])."""
    for item in overrides:
        if "=" not in item:
            raise PeftlabError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        try:
            value = parse_yaml(text, f"override '{key}'")
        except YamlSyntaxError as err:
            raise PeftlabError(f"override '{key}': the value {text!r} is not valid YAML ({err.problem})") from None
        set_dotted(raw, key, value, f"override '{item}'")
    return raw


# `section.key=value`: what an override looks like, as opposed to a config file's path (which may hold a '=' too).
_OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")


def config_and_overrides(config: str | Path | None, overrides: list[str]) -> tuple[Path | None, list[str]]:
    """Split `peftlab train ARGS...` into the config file and the overrides.

    The config file is optional: when the first argument looks like `key=value` and is no file, every argument is
    an override on the defaults (`peftlab train data.task=dialogsum method.name=lora`).
    """
    overrides = list(overrides or [])
    if config is not None and _OVERRIDE.match(str(config)) and not Path(config).exists():
        return None, [str(config), *overrides]
    return (Path(config) if config is not None else None), overrides


CHECKPOINTING = (False, True, "selective", "full")


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks that types cannot express."""
    t = cfg.train
    if t.lr is not None and t.lr <= 0:
        raise PeftlabError(f"train.lr must be positive, got {t.lr}")
    if t.epochs < 1 or t.batch_size < 1 or t.grad_accum < 1 or t.batch_tokens < 1:
        raise PeftlabError("train.epochs, train.batch_size, train.grad_accum and train.batch_tokens must be >= 1")
    if t.mixed_precision not in ("auto", "no", "bf16"):
        raise PeftlabError(f"train.mixed_precision must be auto, no or bf16, got '{t.mixed_precision}'")
    if t.micro_tokens is not None and t.micro_tokens < 0:
        raise PeftlabError(f"train.micro_tokens must be >= 0 (0: never split a batch), got {t.micro_tokens}")
    if t.class_balance < 0:
        raise PeftlabError(f"train.class_balance must be >= 0 (0: unweighted, 1: balanced), got {t.class_balance}")
    if t.activation_checkpointing not in CHECKPOINTING:
        choice = t.activation_checkpointing
        raise PeftlabError(f"train.activation_checkpointing must be false, true, selective or full, got {choice!r}")
    if t.schedule not in ("linear", "cosine", "constant"):
        raise PeftlabError(f"train.schedule must be linear, cosine or constant, got '{t.schedule}'")
    d, m = cfg.data, cfg.method
    for key, value in (("data.limit_train", d.limit_train), ("data.limit_eval", d.limit_eval)):
        if value is not None and value < 1:  # 0 used to mean "everything" and a negative "all but N"
            raise PeftlabError(f"{key} must be >= 1 (leave it unset to use every example), got {value}")
    for key, value in (("experiments.probe_limit", cfg.experiments.probe_limit),
                       ("experiments.forgetting_limit", cfg.experiments.forgetting_limit)):
        if value < 1:  # a slice [:0] probes nothing, and [:-1] all but the last example
            raise PeftlabError(f"{key} must be >= 1, got {value}")
    if d.too_long not in ("cut", "error"):
        raise PeftlabError(f"data.too_long must be cut or error, got {d.too_long!r}")
    if d.max_length < 8 or d.shots < 0:
        raise PeftlabError(f"data.max_length must be >= 8 and data.shots >= 0, got {d.max_length} and {d.shots}")
    if m.num_virtual_tokens < 1 or m.r < 1:
        raise PeftlabError(
            f"method.num_virtual_tokens and method.r must be >= 1, got {m.num_virtual_tokens} and {m.r}"
        )
    if len(cfg.data.split) != 3 or abs(sum(cfg.data.split) - 1) > 1e-6:
        raise PeftlabError(f"data.split must be three fractions summing to 1, got {cfg.data.split}")
    return cfg


def check_limit(limit: int | None) -> None:
    """A command's `--limit`: unset (every example) or at least 1. 0 used to mean every example, and a negative
    number all but that many, since both went into a slice."""
    if limit is not None and limit < 1:
        raise PeftlabError(f"--limit must be >= 1 (leave it out to score every example), got {limit}")


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a run config from YAML (or only from `base` and overrides), check it, and return the typed config."""
    raw: dict = copy.deepcopy(base or {})  # overrides write into nested sections: never into the caller's
    if path is not None:
        raw = deep_merge(raw, read_config_file(Path(path)))
    raw = apply_overrides(raw, list(overrides))
    return validate(from_dict(RunConfig, raw))


def read_config_file(path: Path) -> dict:
    """A run config file's mapping; an empty file or one that holds a list or a single value is an error."""
    if not path.exists():
        raise PeftlabError(f"{path}: no such config file")
    loaded = read_yaml(path)
    if loaded is None:
        # An empty file used to start a default run (50 steps of PubMedQA) as if it were a config.
        raise PeftlabError(f"{path}: empty config; give at least the settings that differ from the defaults "
                           "(e.g. method: {name: lora}), or train on the defaults with key=value overrides only")
    if not isinstance(loaded, dict):
        raise PeftlabError(f"{path}: expected a mapping of config sections (name, model, data, method, train, "
                           f"...), got {describe(loaded)}")
    return loaded


def read_run_config(path: Path) -> RunConfig:
    """The config.yaml a run wrote into its folder. The run writes every section, so a missing one means the file
    was cut off or edited: the defaults would fill the gap, and the run would be scored as a different run (the
    default task, method or base model) without a word."""
    raw = read_config_file(Path(path))
    sections = [name for name, tp in typing.get_type_hints(RunConfig).items() if _is_dataclass_type(tp)]
    missing = [s for s in sections if not isinstance(raw.get(s), dict)]
    if missing:
        raise PeftlabError(f"{path}: no '{missing[0]}' section; a run writes every section, so the file was cut off "
                           "or edited: train the run again")
    return validate(from_dict(RunConfig, raw))


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` on top of `base`, merging nested sections."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif value is None and isinstance(out.get(key), dict):
            continue  # an empty section (`train:`) adds nothing; it does not wipe the base's
        else:
            out[key] = value
    return out


def save_config(cfg: RunConfig, path: Path) -> None:
    write_text_atomic(path, dump_yaml(to_dict(cfg)))
