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
