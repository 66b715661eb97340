"""What a run reports about the machine it used: peak memory and library versions.

Runs and benchmarks read peak memory through `peak_rss_mb` alone, so their figures are the same measure.
"""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path

import accelerate
import peft
import torch
import transformers

from peftlab import __version__


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux keeps ru_maxrss across exec, so a run that `compare` starts in a fresh process would report its parent's
    peak; VmHWM belongs to this process alone. Elsewhere (macOS) ru_maxrss is all there is, in bytes.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def versions() -> dict:
    """The library versions and machine a run used, for its result.json."""
    return {
        "peftlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
    }


def cpu_model() -> str:
    """The CPU's model name where Linux says it (`platform.processor()` there is only "x86_64"), and its widest matmul
    instruction set: the same two-core sandbox has run on an AMD EPYC Zen 3 (AVX2), a Zen 4 (AVX-512 with
    AVX512_BF16) and an Intel Xeon with AMX, and the ratios differ between them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 with AVX512_BF16"),
                                         ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "")
    return " ".join(part for part in (platform.machine(), info.get("model name", ""), isa) if part)
