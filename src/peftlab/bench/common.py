"""What both benchmarks share: the model and data they run on, the dtype check, the machine they describe and the
results file they append to."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from peftlab.core.errors import PeftlabError, unknown_name
from peftlab.core.files import write_text_atomic
from peftlab.core.resources import cpu_model

REPO = Path(__file__).resolve().parents[3]
DEFAULT_RESULTS = Path("bench/RESULTS.md")


def check_dtype(dtype: str) -> None:
    """The benchmarks name their dtype outright ("auto" would hide what was measured)."""
    from peftlab.models.device import DTYPES

    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, list(DTYPES))


def tiny_model(out: Path) -> Path:
    """--smoke: the test suite's tiny random Llama (tests/builders.py), so the smoke run needs no model download."""
    import importlib.util

    builders = REPO / "tests" / "builders.py"
    if not builders.is_file():
        raise PeftlabError(f"--smoke needs the source checkout: {builders} not found")
    spec = importlib.util.spec_from_file_location("peftlab_bench_builders", builders)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_causal(out)


def data_file(task_name: str) -> Path:
    """The task's shipped data file, relative to the working directory or else to the source checkout."""
    from peftlab.data.tasks import DEFAULT_DATA

    path = Path(DEFAULT_DATA[task_name])
    return path if path.is_file() else REPO / path


def prompt_format(model: str):
    """The tokenizer-side of `load_model` (no weights): enough to encode."""
    from peftlab.models.hf_folder import load_tokenizer, model_kind
    from peftlab.models.packaged import resolve_model_dir
    from peftlab.prompts.format import PromptFormat

    path = resolve_model_dir(model)
    tokenizer, kind = load_tokenizer(path), model_kind(path)
    return PromptFormat(tokenizer, kind, kind == "causal" and bool(getattr(tokenizer, "chat_template", None)))


def encode_dialogsum(model: str, n: int, max_length: int):
    """The first n DialogSum dev dialogues, encoded once with peftlab's encoder and the model's chat template."""
    from peftlab.data.tasks import get_task
    from peftlab.prompts.encoding import encode

    task = get_task("dialogsum")
    fmt = prompt_format(model)
    examples = task.load(data_file("dialogsum"))[:n]
    return fmt, [encode(task, ex, fmt, max_length) for ex in examples], examples


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX): only there is bf16 autocast worth timing.

    torch's `get_cpu_capability()` says AVX512 on both an AVX-512 CPU with and without AVX512_BF16, so the flags in
    /proc/cpuinfo decide; AMX implies a bf16 matmul unit.
    """
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and capability in ("AVX512", "AVX512_BF16", "AMX")


def machine_line(device: str = "cpu") -> str:
    """The machine a result was measured on: date, CPU, cores, the GPU if `device` is one, torch and its threads."""
    import torch

    gpu = f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return (f"{datetime.date.today().isoformat()}, {cpu_model()}, "
            f"{os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")


def append_results(path: Path, title: str, body: str, device: str = "cpu") -> None:
    """Append a dated section to the results file, creating it with a header first."""
    old = path.read_text() if path.is_file() else (
        "# peftlab benchmark results\n\nAppended by `peftlab bench train` and `peftlab bench eval`; "
        "bench/README.md says how each side is built.\n"
    )
    write_text_atomic(path, f"{old.rstrip()}\n\n## {title} ({machine_line(device)})\n\n{body}\n")
