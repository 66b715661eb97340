"""A decision study's repeats: folds keep val for the selection points of methods that train nothing."""

from __future__ import annotations

from builders import PUBMEDQA

from peftlab.core.config import load_config
from peftlab.methods.registry import get_method
from peftlab.recipes.train_run import task_parts


def test_a_fold_val_is_val_for_selection_and_demos_for_a_final_few_shot_run():
    cfg = load_config(None, ["method.name=few-shot", f"data.path={PUBMEDQA}", "data.folds=5", "data.fold=0"])
    (final,) = task_parts(cfg, get_method("few-shot"))
    (select,) = task_parts(cfg, get_method("few-shot"), select=True)
    assert not final.splits["val"] and len(final.splits["train"]) == len(select.splits["train"]) + len(
        select.splits["val"])  # the final run's demo pool holds the val fold
    assert select.splits["val"] and select.splits["test"] == final.splits["test"]
