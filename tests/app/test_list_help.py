"""`qready list` reads the registries and the installed recipes; every command's --help has examples;
installed recipes run by name."""

from __future__ import annotations

import pytest

from qready.app.catalogue import catalogue, packaged_recipes, resolve_recipe
from qready.app.cli import build_parser, main
from qready.models import MODELS
from qready.regularizers import REGULARIZERS


def test_list_shows_every_registry_and_the_recipes(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for section in ("models", "datasets", "regularizers", "qat-methods", "palettizers", "recipes"):
        assert f"{section}: " in out
    sections = catalogue()
    assert sections["models"] == MODELS.names() and sections["regularizers"] == REGULARIZERS.names()
    assert "demo" in sections["recipes"] and len(sections["recipes"]) > 5
    assert main(["list", "recipes"]) == 0
    assert capsys.readouterr().out.split() == sections["recipes"]
    assert main(["list", "colours"]) == 2
    assert "unknown section 'colours'" in capsys.readouterr().err


def test_installed_recipes_resolve_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("demo") == packaged_recipes()["demo"] == resolve_recipe("demo.yaml")
    (tmp_path / "demo").write_text("name: mine\n")  # a file of that name wins
    assert resolve_recipe("demo").resolve() == (tmp_path / "demo").resolve()


@pytest.mark.parametrize("command", ["demo", "train", "run", "report", "inspect", "export", "sweep", "list"])
def test_help_has_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"qready {command}" in out
