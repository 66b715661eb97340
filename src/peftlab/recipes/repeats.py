"""A decision study's repeats: each chosen config rerun per seed or per fold, so every number gets an interval.

`repeats: {seeds: [0, 1, 2]}` reruns each method with these train seeds on the same split (a method whose result
does not depend on the seed runs once); `repeats: {folds: 5}` reruns it on each of k folds, so every example is a
test example exactly once. Tuning sees fold 0's train and val only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import StrictBool, StrictFloat, StrictInt, model_validator
from pydantic.dataclasses import dataclass as section

from peftlab.core.config import RunConfig
from peftlab.core.schema import FORBID, checked, setting
from peftlab.methods.registry import get_method
from peftlab.recipes.search import base_of, trial_config

SHAPE = "{seeds: [0, 1, 2]} or {folds: 5}, optionally with race: true and alpha: 0.05"


@section(frozen=True, config=FORBID)
class Repeats:
    """`seeds`: rerun with these train seeds on the same split; `folds`: rerun on each of k folds (data.fold).

    `race`: repeats go in rounds (seed or fold k of every method), and after each round a method significantly
    worse than the leader (paired test, Holm-corrected at `alpha`) gets no more repeats (`report.stats.race_round`).
    """

    seeds: tuple[StrictInt, ...] = setting((), "rerun each chosen config with these train seeds", min_length=1)
    folds: StrictInt = setting(0, "rerun each chosen config on each of k folds", "test, val, train", ge=3)
    race: StrictBool = setting(False, "drop a method significantly worse than the leader after each round")
    alpha: StrictFloat = setting(0.05, "the race's significance level (Holm-corrected)", gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _seeds_or_folds(cls, raw: Any) -> Any:
        # A section read from a study (a mapping) names one of the two; `Repeats()` in code is one run per method.
        if isinstance(raw, dict) and len({"seeds", "folds"} & set(raw)) != 1:
            raise ValueError(f"expected {SHAPE}")
        return raw

    @property
    def rounds(self) -> int:
        return self.folds or len(self.seeds) or 1


def parse_repeats(raw: Any) -> Repeats:
    """`{seeds: [0, 1, 2]}` or `{folds: 5}`, either with `race: true` (and `alpha`); None means one run per method
    at its configured seed."""
    return Repeats() if raw is None else checked(Repeats, raw, "repeats", "study", SHAPE)


def deterministic(cfg: RunConfig) -> bool:
    """Methods whose result does not depend on the train seed: zero/few-shot (nothing trains) and the linear head
    (a convex fit on frozen features). Over seeds they run once and that run stands for every seed."""
    method = get_method(cfg.method.name)
    return not method.trains or method.build is not None


def repeat_configs(cfg: RunConfig, repeats: Repeats) -> list[RunConfig]:
    """The final runs of one chosen config: one per seed (once for a deterministic method) or one per fold."""
    if repeats.folds:
        return [replace(cfg, name=f"{cfg.name}-fold{k}", data=replace(cfg.data, fold=k, folds=repeats.folds))
                for k in range(repeats.folds)]
    if not repeats.seeds:
        return [cfg]
    seeds = repeats.seeds[:1] if deterministic(cfg) else repeats.seeds
    return [replace(cfg, name=f"{cfg.name}-seed{s}", train=replace(cfg.train, seed=s)) for s in seeds]


def tuning_config(cfg: RunConfig, repeats: Repeats) -> RunConfig:
    """What tuning runs on: the study split, or fold 0's train/val with folds (fold 0's test is never scored)."""
    return replace(cfg, data=replace(cfg.data, fold=0, folds=repeats.folds)) if repeats.folds else cfg


def chosen_config(cfg: RunConfig, chosen: dict) -> RunConfig:
    """The run's config with the chosen values set (same name and folder as the run)."""
    if not chosen.get("params"):
        return cfg
    return trial_config(base_of(cfg), chosen["params"], cfg.name, Path(cfg.output_dir))


def vars_repeats(repeats: Repeats) -> dict:
    """The repeats as study.json records them."""
    out = {"seeds": list(repeats.seeds)} if repeats.seeds else ({"folds": repeats.folds} if repeats.folds else {})
    return {**out, "race": repeats.race, "alpha": repeats.alpha} if repeats.race else out
