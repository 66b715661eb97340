"""The `peftlab` command: a map from subcommands to typed functions.

Every user-caused error (`PeftlabError`) is printed on one line with exit code 2 and no traceback (exit code 3 for
`NotSupported`: a missing optional package or backend, or a method peft cannot run on the model). A SIGTERM or
SIGINT that stops `train` or `compare` is one line too, with exit code 143 or 130 (`core.signals.Stopped`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftlab.core.allocator import reuse_freed_memory
from peftlab.core.config import DEFAULT_MODEL, config_help
from peftlab.core.errors import NotSupported, PeftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0] if __doc__ else None)
console = Console()


@app.command()
def models() -> None:
    """List the packaged models: kind, parameters, source, whether cached, and how to install a missing one."""
    from peftlab.models.packaged import list_models

    rows = list_models()
    table = Table("name", "kind", "params", "source", "cached")
    for row in rows:
        params = f"{row['params'] / 1e6:.1f}M" if row["params"] else "? (not cached)"
        table.add_row(row["name"], row["kind"], params, row["source"], "yes" if row["cached"] else "no")
    console.print(table)
    for row in rows:
        if row["install"]:  # soft_wrap: the command stays on one line, to copy
            console.print(f"{row['name']} is not installed; run: {row['install']}", markup=False, soft_wrap=True)
    console.print("Any local Hugging Face folder works too: --model path/to/folder")


@app.command()
def methods() -> None:
    """List the methods: what each trains, its default learning rate, and what it does."""
    from peftlab.methods.registry import METHODS

    table = Table("name", "trains", "default lr", "description")
    for m in METHODS.values():
        table.add_row(m.name, m.trained_part, f"{m.default_lr:g}" if m.default_lr else "-", m.description)
    console.print(table)
    console.print("Set one with method.name=NAME; its settings are method.* keys (peftlab train --help).")


@app.command("eval")
def eval_cmd(
    run: Annotated[Path | None, typer.Argument(help="a finished run folder: scored with its own settings")] = None,
    task: Annotated[str | None, typer.Option(help="task name (pubmedqa, dialogsum, alpaca, chat, ...) or task YAML; "
                                                   "default: the run's")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for metrics.json and predictions.jsonl; "
                                                  "default with a run: RUN/eval/<data file or split>")] = None,
    data: Annotated[str | None, typer.Option(help="labelled data file (JSONL, JSON, CSV, Parquet)")] = None,
    split: Annotated[str | None, typer.Option(help="all, train, val or test (a run: its own split, default test)")]
    = None,
    model: Annotated[str | None, typer.Option(help="packaged model name or local HF folder")] = None,
    adapter: Annotated[str | None, typer.Option(help="peft adapter folder or peftlab run folder")] = None,
    shots: Annotated[int | None, typer.Option(help="in-context examples from the train split")] = None,
    limit: Annotated[int | None, typer.Option(help="score only the first N examples")] = None,
    template: Annotated[int | None, typer.Option(help="instruction phrasing index")] = None,
    max_length: Annotated[int | None, typer.Option(help="max prompt + target tokens (default 512)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin/.pt weights")] = False,
    calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate",
                                                   help="contextual calibration of label scores")] = None,
    force: Annotated[bool, typer.Option(help="with a run: let flags override the run's own settings")] = False,
) -> None:
    """Score a finished run (`peftlab eval RUN [--data FILE]`) or a model on a task, and write metrics.json and
    predictions.jsonl."""
    from peftlab.recipes.eval_run import EvalOptions, eval_run, run_eval

    opts = EvalOptions(task=task, data=data, split=split, model=model, adapter=adapter, shots=shots, limit=limit,
                       template=template, max_length=max_length, device=device, allow_pickle=allow_pickle,
                       calibrate=calibrate)
    if run is not None:
        out = out or run / "eval" / (Path(data).stem if data else split or "test")
        metrics = eval_run(run, opts, out, force)
    else:
        if out is None:
            raise PeftlabError("--out is needed without a run folder")
        metrics = run_eval(opts, out)
    print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


@app.command("predict")
def predict_cmd(
    run: Annotated[Path, typer.Argument(help="a finished run folder")],
    input: Annotated[Path, typer.Option("--input", help="rows to answer (JSONL, JSON, CSV, Parquet); targets "
                                                        "not needed")],
    out: Annotated[Path, typer.Option(help="JSONL of id, prediction (and probabilities for classification)")],
    limit: Annotated[int | None, typer.Option(help="answer only the first N rows")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps; default: the run's")] = None,
) -> None:
    """Answer new rows with a trained run, with the run's own prompt, labels and calibration."""
    from peftlab.recipes.eval_run import predict_run

    rows = predict_run(run, input, out, limit, device)
    console.print(f"wrote {len(rows)} predictions to {out}")


def print_metrics(metrics: dict) -> None:
    table = Table("metric", "value")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int | str):
            table.add_row(key, str(value))
    console.print(table)


# `peftlab train --help` ends with every config key, its default and help text, read from the config's fields.
@app.command(epilog="Config keys (key=value on the command line, or in the YAML file):\n\n" + escape(config_help()))
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML (leave it out to train on the defaults plus "
                                                "key=value overrides)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.lr=3e-4")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = False,
) -> None:
    """Train one method as configured and write runs/<name>/ (adapter, logs, metrics, predictions, result.json)."""
    from peftlab.core.config import config_and_overrides
    from peftlab.core.result import has_result, read_result
    from peftlab.recipes.runner import load_run_config
    from peftlab.recipes.train_run import run_training

    config, overrides = config_and_overrides(config, overrides)
    cfg = load_run_config(config, [*overrides, *(["train.resume=true"] if resume else [])])
    try:
        run_dir = run_training(cfg)
    except NotSupported as err:
        from peftlab.report.notes import write_not_run

        write_not_run(cfg, str(err))  # the study report shows why this run has no row
        raise
    if has_result(run_dir):
        print_metrics({k: v for k, v in read_result(run_dir).metrics.items() if k.startswith("test_")})
        console.print(f"run folder: {run_dir}")


@app.command()
def precision(
    config: Annotated[Path, typer.Argument(help="run config YAML (or only key=value overrides on the defaults)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. method.name=lora")] = None,
    seeds: Annotated[int, typer.Option(min=2, help="fp32 seeds bf16 must not fall below all of")] = 3,
    metric: Annotated[str | None, typer.Option(help="val metric to compare (default: the task's primary)")] = None,
) -> None:
    """Train in fp32 over seeds and once in bf16; if bf16's val metric is below every seed's, auto keeps fp32."""
    from peftlab.core.config import config_and_overrides
    from peftlab.recipes.precision_check import check_precision
    from peftlab.recipes.runner import load_run_config

    cfg = load_run_config(*config_and_overrides(config, overrides))
    check = check_precision(cfg, seeds, metric)
    table = Table("run", f"val {check.metric}")
    for seed, value in check.fp32.items():
        table.add_row(f"fp32, seed {seed}", f"{value:.4f}")
    table.add_row(f"bf16, seed {check.bf16_seed}", f"{check.bf16:.4f}")
    console.print(table)
    console.print(f"{check.reason}: " + (f"auto keeps fp32 for {cfg.model.name} {cfg.method.name} on this CPU"
                                         if check.below else "bf16 is as good as fp32 here; auto may pick it"))


@app.command()
def cv(
    config: Annotated[Path, typer.Argument(help="run config YAML (or only key=value overrides on the defaults)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. method.head_c=0.3")] = None,
    folds: Annotated[int | None, typer.Option(help="number of folds (default: data.folds)")] = None,
    executor: Annotated[str, typer.Option(help="where folds run: local (worker processes) or ray")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="folds at once")] = 1,
) -> None:
    """k-fold cross-validation: one run per fold in runs/<name>/fold-<k>/, then mean and spread in cv.md."""
    from peftlab.core.config import config_and_overrides
    from peftlab.recipes.cv import run_cv
    from peftlab.recipes.executors import parse_executor
    from peftlab.recipes.runner import load_run_config

    cfg = load_run_config(*config_and_overrides(config, overrides))
    summary = run_cv(cfg, folds, parse_executor(None, executor, workers))
    table = Table("metric", "mean", "std")
    for key, s in summary["metrics"].items():
        table.add_row(key, f"{s['mean']:.4f}", f"{s['std']:.4f}")
    console.print(table)
    console.print(f"study folder: {Path(cfg.output_dir) / cfg.name} (cv.md, cv.json, report.html)")


@app.command()
def compare(
    study: Annotated[Path, typer.Argument(help="study YAML (see examples/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides applied to every run")] = None,
    only: Annotated[list[str] | None, typer.Option(help="run only these run names")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="print the runs and an estimated time; train nothing")] = False,
    executor: Annotated[str | None, typer.Option(help="where runs go: local (worker processes) or ray; default: "
                                                      "the study's executor.kind, else local")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="runs at once; default: the study's executor.workers, "
                                                            "else 1")] = None,
) -> None:
    """Run every method of a study on the same data and budget; write results.md, results.csv and report.html."""
    from peftlab.recipes.compare import run_study

    study_dir = run_study(study, overrides or [], only, plan=plan, executor_kind=executor, workers=workers)
    md = study_dir / "results.md"
    if plan:
        return
    if md.exists():
        console.print(md.read_text())


@app.command()
def report(study_dir: Annotated[Path, typer.Argument(help="a study folder holding run folders")]) -> None:
    """Rebuild results.md, results.csv and report.html from the run folders' result.json files."""
    from peftlab.report.study_report import build_study_report

    console.print(f"report: {build_study_report(study_dir)}")


@app.command()
def serve(
    adapter: Annotated[list[str] | None, typer.Option(help="name=DIR (peft folder or run folder); repeatable")] = None,
    model: Annotated[str, typer.Option(help="packaged model name or local HF folder")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="address to bind; there is no authentication")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_tokens_cap: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body accepted")] = 65536,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt accepted, in tokens")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible HTTP API (see docs/serving.md)."""
    from peftlab.deploy.serve import serve as run_server

    run_server(
        model,
        adapter or [],
        host=host,
        port=port,
        device=device,
        max_tokens_cap=max_tokens_cap,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
    )


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="a run folder holding a LoRA or IA3 adapter")],
    out: Annotated[Path, typer.Option(help="folder for the merged transformers model")],
) -> None:
    """Merge a run's adapter into its base model and save a plain transformers folder (safetensors + tokenizer)."""
    from peftlab.deploy.export import merge_run

    console.print(f"merged model: {merge_run(run_dir, out)}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder holding a LoRA or IA3 adapter")],
    gguf: Annotated[Path, typer.Option(help="GGUF file to write (for llama.cpp, Ollama)")],
    f16: Annotated[bool, typer.Option(help="store matrices as F16 instead of F32")] = False,
) -> None:
    """Merge a run's adapter and write the model as a GGUF file (llama-family models)."""
    from peftlab.deploy.export import export_gguf

    console.print(f"GGUF file: {export_gguf(run_dir, gguf, f16=f16)}")


@app.command()
def distill(
    teacher: Annotated[str, typer.Option(help="MODEL[:ADAPTER_OR_RUN], a run folder, or a JSONL/CSV of outputs")],
    task: Annotated[str, typer.Option(help="task name or custom task YAML")],
    out: Annotated[Path, typer.Option(help="JSONL file of {id, output} to write (use it as data.target)")],
    data: Annotated[str | None, typer.Option(help="data file; default: the task's file under data/")] = None,
    split: Annotated[str, typer.Option(help="train, val or test (students train on train)")] = "train",
    limit: Annotated[int | None, typer.Option(help="only the first N examples of the split")] = None,
    seed: Annotated[int, typer.Option(help="split seed: must match the student's data.seed")] = 0,
    template: Annotated[int, typer.Option(help="instruction phrasing index")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
) -> None:
    """Write a teacher's outputs for a split, keyed by example id, for training a student on them (data.target)."""
    from peftlab.core.config import load_config
    from peftlab.experiments.distill import generate_teacher_outputs

    if split not in ("train", "val", "test"):
        raise PeftlabError(f"--split must be train, val or test, got '{split}'")
    cfg = load_config(None, [], base={"model": {"device": device},
                                      "data": {"task": task, "path": data, "seed": seed, "template": template}})
    path = generate_teacher_outputs(teacher, cfg, out, split=split, limit=limit)
    console.print(f"teacher outputs: {path}  (train a student with data.target={path})")


@app.command()
def probe(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    limit: Annotated[int | None, typer.Option(help="test examples to perturb (default 50)")] = None,
) -> None:
    """Brittleness probe: perturb a run's test prompts; flip rates and metric spread to probe.json, result.json."""
    from peftlab.recipes.probe_run import run_probe

    print_metrics(run_probe(run_dir, limit))
    console.print(f"wrote {run_dir / 'probe.json'}")


@app.command()
def sweep(
    study: Annotated[Path, typer.Argument(help="study YAML with `base` and a `sweep:` section")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides applied to every trial")] = None,
    trials: Annotated[int | None, typer.Option(help="finished trials wanted in total (default: sweep.trials)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna DB URL (default: <study>/optuna.db)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed (default: sweep.seed); one per machine sharing "
                                                  "--storage")] = None,
    executor: Annotated[str | None, typer.Option(help="where trials run: local (worker processes) or ray; default: "
                                                      "the study's executor.kind, else local")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="trials at once; default: the study's "
                                                            "executor.workers, else 1")] = None,
) -> None:
    """Optuna search (TPE, median pruning) over a study's space; resumable; writes best_config.yaml."""
    from peftlab.recipes.sweep import run_sweep

    study_dir = run_sweep(study, trials, storage, overrides or [], seed, executor, workers)
    md = study_dir / "results.md"
    if md.exists():
        console.print(md.read_text())


bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks against the plain transformers + peft way.")
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train(
    model: Annotated[str, typer.Option(help="packaged model name or local HF folder")] = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help="comma-separated list")] = "lora,full,prompt-tuning",
    n: Annotated[int, typer.Option(help="DialogSum dialogues trained on")] = 64,
    max_length: Annotated[int, typer.Option(help="max prompt + target tokens")] = 512,
    batch: Annotated[int, typer.Option(help="examples per batch")] = 4,
    results: Annotated[Path | None, typer.Option(help="markdown file to append to (default bench/RESULTS.md)")] = None,
    smoke: Annotated[bool, typer.Option(help="tiny random model, n=8, batch 2; writes no results file")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the raw numbers as JSON")] = None,
    micro_tokens: Annotated[int | None, typer.Option(help="peftlab train.micro_tokens (default: config)")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="runs of each side, in the order AB BA ...; times are means")] = 2,
    device: Annotated[str, typer.Option(help="cpu, or cuda to benchmark a GPU")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 (peftlab's default on a GPU)")] = "float32",
    references: Annotated[str, typer.Option(help="trainer and/or trl (TRL padding-free SFTTrainer)")] = "trainer,trl",
    autocast: Annotated[str, typer.Option(help="no and/or bf16 (bf16 autocast over fp32 weights, every side)")] = "no",
) -> None:
    """Training tokens/s, memory and loss agreement of peftlab against transformers.Trainer + peft."""
    from peftlab.bench.common import DEFAULT_RESULTS
    from peftlab.bench.train_bench import TrainBenchOptions, run_train_bench

    if smoke:
        # max_length stays: at 128 every tiny-tokenizer row is cut to exactly 128 tokens, and the math check would
        # never see a padded reference batch.
        n, batch = min(n, 8), min(batch, 2)
    opts = TrainBenchOptions(model=model, methods=_names(methods), n=n, max_length=max_length, batch=batch,
                             results=results if results or smoke else DEFAULT_RESULTS, smoke=smoke,
                             json_out=json_out, micro_tokens=micro_tokens, rounds=rounds, device=device, dtype=dtype,
                             references=_names(references), autocasts=_names(autocast))
    run_train_bench(opts)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated option as its names, blanks dropped (`"lora, full,"` is lora and full)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@bench_app.command("eval")
def bench_eval(
    model: Annotated[str, typer.Option(help="packaged model name or local HF folder")] = DEFAULT_MODEL,
    n: Annotated[int, typer.Option(help="DialogSum dialogues generated for")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per dialogue")] = 60,
    score_n: Annotated[int, typer.Option(help="PubMedQA items for the label-scoring timing")] = 100,
    results: Annotated[Path | None, typer.Option(help="markdown file to append to (default bench/RESULTS.md)")] = None,
    smoke: Annotated[bool, typer.Option(help="tiny random model, small n; writes no results file")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the raw numbers as JSON")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="blocks of the one-at-a-time loop, each then a peftlab run")] = 4,
    device: Annotated[str, typer.Option(help="cpu, or cuda to benchmark a GPU")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 (peftlab's default on a GPU)")] = "float32",
    generate_batch: Annotated[int, typer.Option(min=0, help="rows of batched model.generate (0: skip it)")] = 16,
) -> None:
    """Generation and scoring speed: peftlab's batched generate against one-at-a-time model.generate."""
    from peftlab.bench.common import DEFAULT_RESULTS
    from peftlab.bench.eval_bench import EvalBenchOptions, run_eval_bench

    if smoke:
        n, max_new_tokens, score_n = min(n, 6), min(max_new_tokens, 8), min(score_n, 10)
    run_eval_bench(EvalBenchOptions(model=model, n=n, max_new_tokens=max_new_tokens,
                                    results=results if results or smoke else DEFAULT_RESULTS, smoke=smoke,
                                    json_out=json_out, score_n=score_n, rounds=rounds, device=device, dtype=dtype,
                                    generate_batch=generate_batch))


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages with exit code 2 (or 3, see above)."""
    reuse_freed_memory()  # freed activations serve the next ones instead of going back to the kernel (see allocator)
    try:
        app(standalone_mode=False)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)  # 3 for NotSupported: a study lists the run as not run instead of failed
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except OSError as err:  # a file system fault no code path turned into its own message: still one line
        where = f"{err.filename}: " if err.filename is not None else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        # Matched by class name: recent typer (0.29) raises its own vendored copy of click's exceptions, not click's.
        names = {c.__name__ for c in type(err).__mro__}
        if "ClickException" in names:
            err.show()
            sys.exit(2)
        if "Abort" in names:
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
