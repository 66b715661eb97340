"""The `peftlab` command: a map from subcommands to typed functions.

Every user-caused error (`PeftlabError`) is printed on one line with exit code 2 and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from peftlab.errors import PeftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0] if __doc__ else None)
console = Console()


@app.command()
def models() -> None:
    """List the packaged models: kind, parameter count, source, and whether the converted copy is cached."""
    from peftlab.models import list_models

    table = Table("name", "kind", "params", "source", "cached")
    for row in list_models():
        params = f"{row['params'] / 1e6:.1f}M" if row["params"] else "? (not cached)"
        table.add_row(row["name"], row["kind"], params, row["source"], "yes" if row["cached"] else "no")
    console.print(table)
    console.print("Any local Hugging Face folder works too: --model path/to/folder")


@app.command("eval")
def eval_cmd(
    task: Annotated[str, typer.Option(help="task name (pubmedqa, pubmedqa-binary, dialogsum) or custom task YAML")],
    out: Annotated[Path, typer.Option(help="output folder for metrics.json and predictions.jsonl")],
    data: Annotated[str | None, typer.Option(help="data file in the task's original format")] = None,
    split: Annotated[str, typer.Option(help="all, train, val or test")] = "all",
    model: Annotated[str, typer.Option(help="packaged model name or local HF folder")] = "smollm2-135m-instruct",
    adapter: Annotated[str | None, typer.Option(help="peft adapter folder or peftlab run folder")] = None,
    shots: Annotated[int, typer.Option(help="in-context examples from the train split")] = 0,
    limit: Annotated[int | None, typer.Option(help="score only the first N examples")] = None,
    template: Annotated[int, typer.Option(help="instruction phrasing index")] = 0,
    max_length: Annotated[int, typer.Option(help="max prompt + target tokens")] = 512,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin/.pt weights")] = False,
) -> None:
    """Score a model (optionally with an adapter) on a task and write metrics.json and predictions.jsonl."""
    from peftlab.runner import run_eval

    metrics = run_eval(
        task=task,
        out=out,
        data=data,
        split=split,
        model=model,
        adapter=adapter,
        shots=shots,
        limit=limit,
        template=template,
        max_length=max_length,
        device=device,
        allow_pickle=allow_pickle,
    )
    print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


def print_metrics(metrics: dict) -> None:
    table = Table("metric", "value")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int | str):
            table.add_row(key, str(value))
    console.print(table)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.lr=3e-4")] = None,
) -> None:
    """Train one method as configured and write runs/<name>/ (adapter, logs, metrics, predictions, result.json)."""
    from peftlab.config import load_config
    from peftlab.io import read_json
    from peftlab.train import run_training

    cfg = load_config(config, overrides or [])
    run_dir = run_training(cfg)
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = read_json(result_file)
        print_metrics({k: v for k, v in result["metrics"].items() if k.startswith("test_")})
        console.print(f"run folder: {run_dir}")


@app.command()
def compare(
    study: Annotated[Path, typer.Argument(help="study YAML (see examples/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides applied to every run")] = None,
    only: Annotated[list[str] | None, typer.Option(help="run only these run names")] = None,
) -> None:
    """Run every method of a study on the same data and budget; write results.md, results.csv and report.html."""
    from peftlab.study import run_study

    study_dir = run_study(study, overrides or [], only)
    md = study_dir / "results.md"
    if md.exists():
        console.print(md.read_text())


@app.command()
def report(study_dir: Annotated[Path, typer.Argument(help="a study folder holding run folders")]) -> None:
    """Rebuild results.md, results.csv and report.html from the run folders' result.json files."""
    from peftlab.report import build_study_report

    console.print(f"report: {build_study_report(study_dir)}")


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages with exit code 2."""
    try:
        app(standalone_mode=False)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
