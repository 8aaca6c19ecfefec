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


def test_every_recipe_is_documented_and_every_documented_recipe_exists():
    import fnmatch
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme[readme.index("Ready recipes live in"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    patterns = re.findall(r"`([a-z0-9_*]+\.yaml)`", paragraph)
    names = sorted({p.name for p in RECIPES + EMBEDDED})
    assert patterns and all(fnmatch.filter(names, pattern) for pattern in patterns), patterns
    undocumented = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    assert not undocumented, f"recipes missing from the README: {undocumented}"
