"""``qready run``: one recipe drives train -> compress -> sweep -> export -> report, with cached stages
and grids of experiments.

Each experiment lives in its own directory. A stage that finished records a fingerprint of the recipe
parts it depends on in ``stages.json``; running again skips it while the fingerprint matches
(``force=True`` redoes everything). A killed training stage resumes from its last checkpoint.

A recipe may carry ``grid: {dotted.key: [values, ...]}``: the cartesian product of the values gives
one experiment each (``seed: [0, 1, 2]`` repeats an experiment over seeds), run in
``<run_dir>/<experiment id>/``; the comparison table averages over seeds (mean ± std).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..recipe import Recipe, RecipeError, apply_overrides, recipe_from_dict
from ..train.stats import format_duration
from .comparison import slug
from .rundir import run_lock

log = logging.getLogger("qready.run")
STAGES_FILE = "stages.json"


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Which stages of one experiment directory are done, keyed by a fingerprint of their inputs."""

    def __init__(self, run_dir: Path, force: bool = False) -> None:
        self.path = run_dir / STAGES_FILE
        self.state: dict[str, str] = {}
        if self.path.is_file() and not force:
            try:
                self.state = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is unreadable; redoing every stage", self.path)

    def done(self, stage: str, key: str) -> bool:
        return self.state.get(stage) == key

    def mark(self, stage: str, key: str) -> None:
        self.state[stage] = key
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.path)

    def invalidate_after(self, stage: str, order: list[str]) -> None:
        """Forget every stage after ``stage`` (their inputs changed)."""
        for later in order[order.index(stage) + 1:]:
            self.state.pop(later, None)


@dataclass(frozen=True)
class Experiment:
    """One point of a grid: its id (directory name), its overrides and the resolved recipe."""

    id: str
    overrides: dict[str, Any]
    recipe: Recipe


def expand_grid(data: dict[str, Any]) -> list[Experiment]:
    """The experiments of a recipe dict: one per point of its ``grid`` (one in all without a grid)."""
    data = dict(data)
    grid = data.pop("grid", None) or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise RecipeError("grid must map dotted recipe keys to non-empty lists of values, e.g. {seed: [0, 1, 2]}")
    if not grid:
        return [Experiment("main", {}, recipe_from_dict(data))]
    keys = list(grid)
    experiments = []
    for values in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, values, strict=True))
        exp_id = "__".join(f"{k.split('.')[-1]}={slug(v)}" for k, v in overrides.items())
        if exp_id in {e.id for e in experiments}:
            exp_id = f"{exp_id}~{fingerprint(overrides)[:6]}"
        items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
        try:
            recipe = recipe_from_dict(apply_overrides(data, items))
        except RecipeError as err:
            raise RecipeError(f"grid point {exp_id}: {err}") from None
        experiments.append(Experiment(exp_id, overrides, recipe))
    return experiments


STAGE_ORDER = ["train", "compress", "sweep", "export", "report"]


# The recipe sections each stage reads (directly or through the stage before it).
TRAIN_SECTIONS = ("seed", "model", "data", "train", "regularizers", "sharpness")


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Fingerprint of each stage's inputs: train <- its sections; compress <- train + ``compress``;
    sweep (of the trained float model) <- train + ``sweep``; export <- compress (or train) + ``export``;
    report <- sweep + compress + export."""
    d = recipe.to_dict()
    train_key = fingerprint({k: d.get(k) for k in TRAIN_SECTIONS})
    compress_key = fingerprint([train_key, d.get("compress")])
    sweep_key = fingerprint([train_key, d.get("sweep")])
    export_key = fingerprint([compress_key, d.get("export")])
    return {"train": train_key, "compress": compress_key, "sweep": sweep_key, "export": export_key,
            "report": fingerprint([sweep_key, compress_key, export_key])}


def run_experiment(recipe: Recipe, run_dir: Path, *, force: bool = False, progress: bool = True,
                   on_stage: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
    """Run (or finish) every stage of one experiment in ``run_dir``; returns its summary dict."""
    from . import stages

    run_dir.mkdir(parents=True, exist_ok=True)
    cache = StageCache(run_dir, force=force)
    keys = stage_keys(recipe)
    ran: dict[str, bool] = {}

    def stage(name: str) -> bool:
        skip = cache.done(name, keys[name])
        ran[name] = not skip
        if on_stage:
            on_stage(name, skip)
        return not skip

    if stage("train"):
        cache.invalidate_after("train", STAGE_ORDER)
        from ..train import checkpoint_exists

        resume = not force and checkpoint_exists(run_dir / "checkpoint")
        prepared = stages.train_recipe(recipe, run_dir, resume=resume, progress=progress)
        cache.mark("train", keys["train"])
    else:
        # the cached training shares every train section with this recipe; later stages read the rest
        prepared = dataclasses.replace(stages.prepare_from_checkpoint(run_dir / "checkpoint"), recipe=recipe)
    if recipe.compress is not None and stage("compress"):
        stages.compress_stage(prepared, run_dir, progress=progress)
        cache.mark("compress", keys["compress"])
    if stage("sweep"):
        rows = stages.sweep_recipe(prepared)
        (run_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
        cache.mark("sweep", keys["sweep"])
    if recipe.export.format != "none" and stage("export"):
        stages.export_stage(prepared, run_dir)
        cache.mark("export", keys["export"])
    if stage("report"):
        stages.experiment_assets(prepared, run_dir)
        cache.mark("report", keys["report"])
    return {"ran": ran, **stages.experiment_summary(run_dir)}


def read_recipe_file(path: Path) -> dict:
    """The mapping of a YAML recipe file (``RecipeError`` naming the file for a missing file, a YAML
    syntax error, with its line, or a top level that is not a mapping). A name that is not a file but
    names an installed recipe (``demo``, see ``qready list recipes``) reads that recipe."""
    from .catalogue import resolve_recipe

    path = resolve_recipe(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r}: a recipe must be a mapping at the top level")
    return data or {}


def run_recipe(source: str | Path | dict, run_dir: Path | None = None, *, force: bool = False,
               progress: bool = True, overrides: list[str] | None = None,
               on_stage: Callable[[str, str, bool], None] | None = None) -> Path:
    """Run every experiment of a recipe (validated up front) and write the comparison report."""
    from .comparison import write_comparison

    if isinstance(source, dict):
        data = source
    else:
        data = read_recipe_file(Path(source))
    if overrides:
        data = apply_overrides(data, overrides)
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping at the top level")
    experiments = expand_grid(data)  # validates every grid point before any work
    from .stages import check_model_args

    for exp in experiments:
        check_model_args(exp.recipe)
    base = experiments[0].recipe
    root = run_dir or Path(base.output_dir) / base.name
    with run_lock(root):  # one `qready run` per directory; finished stages are kept (cached)
        (root / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        summaries = []
        start = time.perf_counter()
        for i, exp in enumerate(experiments):
            exp_dir = root if exp.id == "main" else root / exp.id
            log.info("experiment %s", exp.id)
            callback = (lambda stage, skipped, _id=exp.id: on_stage(_id, stage, skipped)) if on_stage else None
            summary = run_experiment(exp.recipe, exp_dir, force=force, progress=progress, on_stage=callback)
            summaries.append({"id": exp.id, "overrides": exp.overrides, **summary})
            if len(experiments) > 1:
                write_comparison(root)  # an interim report: finished experiments, the rest marked missing
                spent = time.perf_counter() - start
                log.info("grid: %d/%d experiments done in %s, ETA %s", i + 1, len(experiments), format_duration(spent),
                         format_duration(spent / (i + 1) * (len(experiments) - i - 1)))
        (root / "experiments.json").write_text(json.dumps(summaries, indent=2, default=str))
        write_comparison(root)
    return root
