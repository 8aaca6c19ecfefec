"""The package surface: a light import and the stable public names."""

import subprocess
import sys

import qready


def test_import_is_light():
    code = "import sys, qready; print(int('torch' in sys.modules), int('sklearn' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0"]


def test_public_names_resolve():
    for name in ("QuantSpec", "fake_quantize", "quantize", "dequantize", "ptq", "sweep", "Selector",
                 "create_model", "load_dataset", "fit", "TrainConfig", "load_recipe"):
        assert callable(getattr(qready, name)), name
    assert qready.quant.QuantSpec is qready.QuantSpec


def test_the_library_never_imports_the_application_layer():
    """Dependencies run one way: qready.app (CLI, run pipeline, stages) sits above the library."""
    import ast
    from pathlib import Path

    root = Path(qready.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "app" or rel.name == "__main__.py":  # the entry point runs the CLI
            continue
        package = ["qready", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "qready.app" or n.startswith("qready.app.") for n in names):
                offenders.append(str(rel))
    assert not offenders, f"library modules importing qready.app: {sorted(set(offenders))}"
