"""Every ``>>>`` example in the package's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import qready

OPTIONAL = ("onnx", "onnxruntime", "coremltools", "transformers", "matplotlib", "PIL")


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(qready.__path__, "qready.") if not m.name.endswith("__main__")]
    return sorted(names)


def _with_examples() -> list[str]:
    out = []
    for name in _modules():
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and ">>> " in open(spec.origin, encoding="utf-8").read():
            out.append(name)
    return out


def test_some_modules_have_examples():
    assert len(_with_examples()) >= 3


@pytest.mark.parametrize("name", _with_examples())
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if any(dep in str(err) for dep in OPTIONAL):
            pytest.skip(f"{name} needs an optional dependency: {err}")
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
