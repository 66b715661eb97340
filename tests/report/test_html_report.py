"""Tests for peftlab.report.html_report: report.html is one self-contained page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from studykit import make_study

from peftlab.core.errors import PeftlabError
from peftlab.report.html_report import write_report


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "study")


def test_report_is_self_contained(study: Path) -> None:
    page = write_report(study, title="My <study>").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    imgs = re.findall(r'<img class="plot"[^>]*>', page)
    assert len(imgs) >= 4
    assert all(' alt="' in img and ' id="plot-' in img and "data:image/png;base64," in img for img in imgs)
    # Confusion matrices only for the two classification runs.
    assert len(re.findall(r'id="plot-confusion-', page)) == 2
    assert "<title>My &lt;study&gt;</title>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    # The prompt is cut to 300 chars: 36 chars of prefix, then 11 whole repeats of the 23-char phrase.
    assert "a truly wonderful film " * 11 in page and "a truly wonderful film " * 12 not in page
    assert "sst2-0" in page and "summ-2" in page and "sst2-3" not in page  # first 3 ids per task


def test_empty_study_raises(tmp_path: Path) -> None:
    with pytest.raises(PeftlabError, match="no run folder"):  # one line at the CLI, not a ValueError traceback
        write_report(tmp_path)
