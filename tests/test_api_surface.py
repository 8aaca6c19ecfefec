"""The public API is pinned: ``docs/api.md`` lists every public name with its signature, and this test
fails when a name or a signature changes without the page changing with it.

After a deliberate change, regenerate the page: ``QREADY_UPDATE_API=1 python -m pytest tests/test_api_surface.py``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import qready

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MODULES = ("qready", "qready.quant", "qready.quant.ptq", "qready.quant.qat", "qready.quant.palettize",
           "qready.regularizers", "qready.sharpness", "qready.train", "qready.evaluate", "qready.export",
           "qready.models", "qready.data", "qready.recipe")
HEADER = """# Public API

The stable names of qready, by module, with their signatures. A name may gain keyword arguments;
renaming or removing one is a breaking change. This page is checked by the test suite
(`tests/test_api_surface.py`), so it always matches the code.
"""


def _signature(obj: object) -> str:
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    try:
        sig = str(inspect.signature(target))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r" at 0x[0-9a-fA-F]+", "", sig)  # object reprs in defaults: no memory addresses
    return sig.replace("(self, ", "(").replace("(self)", "()")


def _line(module: str, name: str) -> str:
    if module == "qready" and name in qready._LAZY:  # a lazy name, even where a submodule shares it
        obj = getattr(importlib.import_module(qready._LAZY[name]), name)
    elif module == "qready" and name in qready._SUBMODULES:
        return f"- `{name}` (module)"
    else:
        obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj):
        return f"- `class {name}{_signature(obj)}`"
    if callable(obj):
        return f"- `{name}{_signature(obj)}`"
    if inspect.ismodule(obj):
        return f"- `{name}` (module)"
    return f"- `{name}`: {type(obj).__name__}"


def render() -> str:
    parts = [HEADER]
    for module in MODULES:
        mod = importlib.import_module(module)
        names = sorted(getattr(mod, "__all__", None) or [  # no __all__: the names the module itself defines
            n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None) == module])
        parts.append(f"\n## `{module}`\n")
        parts.extend(_line(module, n) for n in names if not n.startswith("_"))
    return "\n".join(parts) + "\n"


def test_public_api_matches_docs_api_md():
    current = render()
    if os.environ.get("QREADY_UPDATE_API"):
        PAGE.write_text(current)
    assert PAGE.is_file(), "docs/api.md is missing: QREADY_UPDATE_API=1 python -m pytest tests/test_api_surface.py"
    assert PAGE.read_text() == current, (
        "the public API changed; if deliberate, regenerate docs/api.md with "
        "QREADY_UPDATE_API=1 python -m pytest tests/test_api_surface.py")


def test_top_level_names_resolve_lazily():
    for name in qready.__all__:
        assert getattr(qready, name) is not None
