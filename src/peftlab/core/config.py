"""Run configuration: typed sections read from YAML, with `section.key=value` overrides from the command line.

The sections are pydantic dataclasses (`core.schema`): every field has help text (`peftlab train --help` lists it),
types, choices and bounds are checked when a config is built, an unknown key is an error that names it, and the
resolved config is saved with each run so the run can be repeated exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from pydantic.dataclasses import dataclass

from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_text_atomic
from peftlab.core.schema import FORBID, checked, empty_is_default, fields_of
from peftlab.core.schema import setting as _f
from peftlab.core.yamlio import YamlSyntaxError, describe, dump_yaml, parse_yaml, read_yaml

DEFAULT_MODEL = "smollm2-135m-instruct"  # the packaged SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized)
ALL = "leave it unset to use every example"  # the note of a limit below 1 (0 used to mean everything)


@dataclass(config=FORBID)
class ModelConfig:
    """`model:` the base model and how it loads."""

    name: StrictStr = _f(DEFAULT_MODEL, "packaged model name (see `peftlab models`) or a local HF folder")
    device: StrictStr = _f("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "weights' dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16")
    chat: StrictBool | None = _f(None, "use the chat template; default: when the tokenizer has one")
    allow_pickle: StrictBool = _f(False, "allow .bin/.pt pickled weights (they can run code when loaded)")


@dataclass(config=FORBID)
class DataConfig:
    """`data:` the task, its data files, and how they are split and encoded."""

    task: StrictStr = _f("pubmedqa", "registered task name or path to a custom task YAML")
    path: StrictStr | None = _f(None, "data file; default: the task's file under data/")
    train: StrictStr | None = _f(None, "training file (JSONL, JSON, CSV or Parquet); replaces data.path")
    val: StrictStr | None = _f(None, "validation file; default: carved from data.train, seeded and stratified")
    test: StrictStr | None = _f(None, "test file; default: carved from data.train by data.split")
    labels: list[StrictStr] | None = _f(None, "alpaca/chat: the label set, which makes the task classification; "
                                              "default: found in the training outputs when they are a few short "
                                              "labels")
    split: list[StrictFloat] = _f([0.8, 0.1, 0.1], "train/val/test fractions when the file has no split of its own")
    fold: StrictInt | None = _f(None, "k-fold cross-validation: which fold is the test split (with `folds`)")
    folds: StrictInt = _f(10, "number of folds for k-fold cross-validation")
    seed: StrictInt = _f(0, "seed of the split")
    template: StrictInt = _f(0, "index of the instruction phrasing")
    max_length: StrictInt = _f(512, "max tokens of prompt + target; the context is cut, never the question or "
                                    "target", ge=8)
    too_long: Literal["cut", "error"] = _f(
        "cut", "a row over data.max_length: cut (a chat loses its oldest turns first; a training row that cannot "
               "fit even then is dropped and counted) or error (stop on it)")
    shots: StrictInt = _f(0, "in-context examples from the train split (few-shot)", ge=0)
    calibrate: StrictBool = _f(False, "classification: contextual calibration of the label scores (divide out the "
                                      "prompt's own label bias, measured on content-free inputs); see "
                                      "evaluate.calibrate")
    limit_train: StrictInt | None = _f(None, "use only the first N training examples", ALL, ge=1)
    limit_eval: StrictInt | None = _f(None, "score only the first N val and test examples", ALL, ge=1)
    target: StrictStr = _f("gold", "training labels: gold, teacher, or a path to a JSONL/CSV of outputs keyed by id")
    mixture: list[dict] = _f(
        [], "multi-task mix: list of {task, path?, weight, templates: [idx...]}; replaces data.task when set"
    )

    @field_validator("split")
    @classmethod
    def _three_fractions(cls, split: list[float]) -> list[float]:
        if len(split) != 3 or abs(sum(split) - 1) > 1e-6:
            raise ValueError("must be three fractions summing to 1")
        return split


@dataclass(config=FORBID)
class MethodConfig:
    """`method:` the method and its settings; `method.peft` and `method.peft_config` are read and checked against
    the installed peft by the method stage (`methods.passthrough.peft_fields`)."""

    name: StrictStr = _f("lora", "a method from `peftlab methods` (lora, dora, vera, oft, ... full, zero-shot), or "
                                 "peft: any peft tuner given by method.peft or method.peft_config")
    r: StrictInt = _f(8, "rank (LoRA and its variants, VeRA, LoHa, LoKr, AdaLoRA's target, HRA, MiSS, Lily, SHiRA, "
                         "HiRA)", ge=1)
    alpha: StrictInt = _f(16, "LoRA alpha (scale = alpha / r); also LoHa, LoKr and AdaLoRA")
    dropout: StrictFloat = _f(0.05, "dropout on the adapter's input (LoRA and its variants, AdaLoRA, VeRA, MiSS, "
                                    "HiRA)")
    target_modules: list[StrictStr] | StrictStr = _f(["q_proj", "v_proj"], "modules to adapt (LoRA, IA3 and the "
                                                                           "other weight tuners), or 'all-linear'")
    peft: dict = _f({}, "peft config fields: with method.name peft, any tuner ({peft_type: VERA, r: 256, ...}); "
                        "with a named method, fields added to its config (docs/methods.md)")
    _empty_peft = empty_is_default("peft")  # `peft:` with every field commented out: no extra fields
    peft_config: StrictStr | None = _f(None, "method.name peft: a saved peft config (adapter_config.json or its "
                                             "folder), e.g. an experiment of peft's method_comparison/; method.peft "
                                             "fields override")
    num_virtual_tokens: StrictInt = _f(20, "virtual tokens for prompt, prefix and P-tuning", ge=1)
    prompt_init: Literal["random", "text"] = _f("random", "prompt-tuning init: random, or text (the task's "
                                                          "instruction)")
    prefix_projection: StrictBool = _f(False, "prefix tuning: re-parameterise the prefix through an MLP")
    encoder_hidden_size: StrictInt = _f(128, "hidden size of the prefix / P-tuning prompt encoder MLP")
    head_layer: StrictInt = _f(16, "linear-head: decoder layer (1-based) whose mean-pooled hidden states feed the "
                                   "head")
    head_c: StrictFloat = _f(0.1, "linear-head: inverse L2 strength of the logistic regression (smaller = "
                                  "stronger)")
    class_balance: StrictFloat = _f(0.5, "linear-head: class weights (n / (k * count)) ** this; 1 balanced, 0 "
                                         "unweighted (gradient methods: train.class_balance)")
    head_text: list[StrictStr] = _f([], "linear-head: text feature sets (words, word-pairs, reported-statistics), "
                                        "each with its own regression, log-probabilities added to the hidden-state "
                                        "head's")
    quant: Literal["nf4", "fp4", "int8"] = _f("nf4", "qlora: how bitsandbytes quantizes the frozen base: nf4, fp4 "
                                                     "(4-bit) or int8 (8-bit)")
    vision: list[StrictStr] = _f([], "vision-language models: also adapt these parts: tower, projector (default: "
                                     "the language model only)")


@dataclass(config=FORBID)
class TrainConfig:
    """`train:` the training loop."""

    epochs: StrictInt = _f(1, "passes over the training split", ge=1)
    max_steps: StrictInt | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    lr: StrictFloat | None = _f(None, "peak learning rate; default: the method's", gt=0)
    weight_decay: StrictFloat = _f(0.0, "AdamW weight decay")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate schedule: linear, cosine or "
                                                                     "constant (all with warmup)")
    warmup_ratio: StrictFloat = _f(0.06, "fraction of steps spent warming up")
    batch_size: StrictInt = _f(8, "max examples per batch", ge=1)
    batch_tokens: StrictInt = _f(4096, "max padded tokens per batch (time scales with tokens, not rows)", ge=1)
    micro_tokens: StrictInt | None = _f(None, "forward/backward a batch in pieces of at most this many padded "
                                              "tokens: the same gradients, activation memory bounded by the piece "
                                              "(0: never split); default: 512 on a CPU, whole batches on a GPU",
                                        "0: never split a batch", ge=0)
    grad_accum: StrictInt = _f(1, "batches per optimizer step", ge=1)
    mixed_precision: Literal["auto", "no", "bf16"] = _f(
        "auto", "bf16 autocast over fp32 weights: auto (on a CPU: bf16 where a probe of the run's first batch "
                "measures it >= 1.2x fp32 with the same loss, cached per CPU; on a GPU: for full fine-tuning with "
                "model.dtype auto), no, bf16")
    shared_prefix: StrictBool | None = _f(None, "run the prompt opening that all rows of a step share (system "
                                                "turn, fixed instruction) once per step instead of once per row: "
                                                "same gradients (with dropout, one mask for the opening per step), "
                                                "less work (single process, right-padded text rows, no activation "
                                                "checkpointing); default: on a CPU, off on a GPU (there it is one "
                                                "more pass of kernel launches)")
    class_balance: StrictFloat = _f(0.0, "classification tasks: weight each example's loss by (n / (k * count of "
                                         "its class)) ** this; 0 unweighted, 1 fully balanced, 0.5 square-root "
                                         "weights", "0: unweighted, 1: balanced", ge=0)
    max_grad_norm: StrictFloat = _f(1.0, "gradient clipping norm (0 turns it off)")
    patience: StrictInt | None = _f(None, "early stopping: epochs without val-loss improvement before stopping")
    eval_every_epoch: StrictBool = _f(True, "val loss and task metric after every epoch")
    seed: StrictInt = _f(0, "seed for init, shuffling and dropout")
    report_to: list[StrictStr] = _f([], "experiment trackers: tensorboard, mlflow")
    threads: StrictInt | None = _f(None, "torch CPU threads; default: all cores")
    checkpoint_every: StrictInt | None = _f(50, "save a resumable checkpoint every N optimizer steps (atomic)")
    resume: StrictBool = _f(False, "continue from the run folder's checkpoint, if one exists")
    activation_checkpointing: StrictBool | Literal["selective", "full"] = _f(
        False, "recompute activations in backward. 'selective': keep matmul and attention outputs, recompute the "
               "cheap elementwise ops (about half the activation memory for a few % more time); 'full' or true: "
               "keep only each layer's input (far less memory, about 1/3 more compute); false: keep everything")


@dataclass(config=FORBID)
class ExperimentsConfig:
    """`experiments:` measures beyond the test metric."""

    forgetting: list[StrictStr] = _f([], "other tasks to score before and after training (catastrophic "
                                         "forgetting)")
    forgetting_data: dict = _f({}, "data file per forgetting task; default: the task's file under data/")
    _empty_forgetting_data = empty_is_default("forgetting_data")
    forgetting_limit: StrictInt = _f(50, "test examples scored per forgetting task", ge=1)
    general_text: StrictStr | None = _f(None, "plain-text file for the general next-token loss; default with "
                                              "forgetting: data/general/general_text.txt")
    probe: StrictBool = _f(False, "brittleness probe: perturb test prompts and measure how often predictions flip")
    probe_limit: StrictInt = _f(50, "test examples used by the brittleness probe", ge=1)


@dataclass(config=FORBID)
class RunConfig:
    """One run: its name and folder, and a section each for the model, data, method, training and experiments.
    A section left empty (`train:` with its keys commented out) is its defaults."""

    name: StrictStr = _f("run", "run name: the folder under output_dir")
    output_dir: StrictStr = _f("runs", "where run folders are written")
    model: ModelConfig = _f(help="the base model", default_factory=ModelConfig)
    data: DataConfig = _f(help="the task, its data and how it is split and encoded", default_factory=DataConfig)
    method: MethodConfig = _f(help="the method and its settings", default_factory=MethodConfig)
    train: TrainConfig = _f(help="the training loop", default_factory=TrainConfig)
    experiments: ExperimentsConfig = _f(help="measures beyond the test metric", default_factory=ExperimentsConfig)

    _empty_section = empty_is_default("model", "data", "method", "train", "experiments")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


SECTIONS = tuple(name for name, info in fields_of(RunConfig).items() if dataclasses.is_dataclass(info.annotation))


def config_help() -> str:
    """Every run config key with its default and help text, a line each: the list `peftlab train --help` ends with."""
    lines = []
    for name, info in fields_of(RunConfig).items():
        if name not in SECTIONS:
            lines.append(_help_line(name, info))
    for section in SECTIONS:
        lines += [_help_line(f"{section}.{name}", info)
                  for name, info in fields_of(fields_of(RunConfig)[section].annotation).items()]
    return "\n".join(lines)


def _help_line(key: str, info: Any) -> str:
    default = info.get_default(call_default_factory=True)
    shown = default if isinstance(default, str) else json.dumps(default)  # as YAML writes it: null, true, [a, b]
    return f"{key} (default {shown}): {info.description}"


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build section `cls` from a nested dict; any problem (an unknown key, a wrong type, a value out of bounds) is
    one `PeftlabError` line naming the dotted key, prefixed by `where` (`data.mixture[0]`)."""
    return checked(cls, raw, where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flat_settings(cfg: Any) -> dict[str, Any]:
    """A config as dotted keys (`train.lr`) to JSON values (tuples as lists): comparable, and storable anywhere."""

    def walk(node: dict, prefix: str) -> dict:
        out: dict = {}
        for key, value in node.items():
            out.update(walk(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    return json.loads(json.dumps(walk(to_dict(cfg), ""), default=str))


def differing_settings(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between two `flat_settings` (a key missing on one side differs), sorted."""
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


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
    return from_dict(RunConfig, apply_overrides(raw, list(overrides)))


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
    missing = [s for s in SECTIONS if not isinstance(raw.get(s), dict)]
    if missing:
        raise PeftlabError(f"{path}: no '{missing[0]}' section; a run writes every section, so the file was cut off "
                           "or edited: train the run again")
    return from_dict(RunConfig, raw)


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
