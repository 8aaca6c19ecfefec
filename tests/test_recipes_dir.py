"""Every recipe shipped in recipes/ (and the embedded demo recipe) validates, grid points included."""

from pathlib import Path

import pytest
import yaml

from qready.app.pipeline import expand_grid

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
EMBEDDED = sorted((Path(__file__).resolve().parents[1] / "src" / "qready" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES + EMBEDDED, ids=lambda p: p.name)
def test_recipe_validates(path):
    experiments = expand_grid(yaml.safe_load(path.read_text()))
    assert experiments and len({e.id for e in experiments}) == len(experiments)


def test_there_are_recipes():
    assert len(RECIPES) >= 8
