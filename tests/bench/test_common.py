"""Tests for peftlab.bench.common: what both benchmarks share."""

from __future__ import annotations

from peftlab.bench.common import native_bf16_cpu


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert native_bf16_cpu("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert native_bf16_cpu("flags\t\t: avx512f amx_tile amx_bf16\n")
    assert not native_bf16_cpu("flags\t\t: fpu avx2 avx512f\n")  # AVX-512 without bf16 (a Zen 3 has AVX2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native_bf16_cpu("flags\t\t: avx512_bf16\n")  # torch built or run without AVX-512 kernels
