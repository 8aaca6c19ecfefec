"""What is exported is what was measured: for every back-end (PTQ W/A, STE, LSQ, EWGS, DKM, SAQ, mixed
precision) the reloaded packed model and the ONNX model in onnxruntime score the accuracy measured on
the in-memory model, on the same split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from qready.data import load_dataset
from qready.evaluate.metrics import evaluate
from qready.export import load_packed, read_packed_meta, save_packed
from qready.models import create_model
from qready.quant import QuantSpec, finalize, finalize_palettized, palettize, prepare_qat, ptq
from qready.sharpness.mixed import prepare_mixed
from qready.sharpness.saq import SAQ

MODEL = {"name": "dwcnn", "kwargs": {"width": 8, "num_classes": 10}}
STEPS = 12  # QAT/DKM fine-tuning steps: enough to move the learned steps/bounds off their initial values


@pytest.fixture(scope="module")
def digits():
    """Digits splits, their loaders and a dwcnn trained for two epochs with plain SGD."""
    splits = load_dataset("digits", seed=0)
    train = DataLoader(splits.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(splits.test, batch_size=128)
    torch.manual_seed(0)
    model = create_model(MODEL["name"], **MODEL["kwargs"])
    _sgd(model, train, steps=2 * len(train), lr=0.3)
    return train, test, model.eval()


def _sgd(model: nn.Module, loader: DataLoader, *, steps: int, lr: float, saq: SAQ | None = None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9 if saq is None else 0.0)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            def closure(x=x, y=y) -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if saq is None:
                opt.zero_grad()
                closure()
                opt.step()
            else:
                saq.step(closure, opt)
            done += 1
            if done == steps:
                break
    model.eval()


def _qat(model: nn.Module, train: DataLoader, method: str, w_bits: int, a_bits: int, *, saq: bool = False,
         **options) -> nn.Module:
    qmodel = prepare_qat(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=train, calib_batches=4,
                         **options)
    _sgd(qmodel, train, steps=STEPS, lr=0.01, saq=SAQ(qmodel, rho=0.05) if saq else None)
    return finalize(qmodel)


def _mixed(model: nn.Module, train: DataLoader) -> nn.Module:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    config = {n: (8 if i in (0, len(names) - 1) else (4 if i % 2 else 3)) for i, n in enumerate(names)}
    qmodel = prepare_mixed(model, config, method="lsq", a_bits="same", calib=train, calib_batches=4)
    _sgd(qmodel, train, steps=STEPS, lr=0.01)
    return finalize(qmodel)


def _dkm(model: nn.Module, train: DataLoader) -> nn.Module:
    pmodel = palettize(model, bits=3, method="dkm")
    _sgd(pmodel, train, steps=STEPS, lr=0.01)
    return finalize_palettized(pmodel)


BACKENDS = {  # name: (build the compressed model, the weights' bit width given to export_onnx)
    "ptq-w4a8": (lambda m, t: ptq(m, QuantSpec(bits=4), calib=t,
                                  act_spec=QuantSpec(bits=8, symmetric=False, granularity="tensor")), 4),
    "ste-w4a4": (lambda m, t: _qat(m, t, "ste", 4, 4), 4),
    "lsq-w3a3": (lambda m, t: _qat(m, t, "lsq", 3, 3), 3),
    "ewgs-w3a3": (lambda m, t: _qat(m, t, "ewgs", 3, 3), 3),
    "dkm-w3": (_dkm, 3),
    "saq-lsq-w3a3": (lambda m, t: _qat(m, t, "lsq", 3, 3, saq=True), 3),
    "mixed-lsq": (_mixed, 8),
}


def _onnx_accuracy(path, test: DataLoader) -> float:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in test:
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((np.argmax(logits, axis=1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_exported_accuracy_equals_reported(digits, backend: str, tmp_path) -> None:
    train, test, model = digits
    torch.manual_seed(0)
    build, w_bits = BACKENDS[backend]
    qmodel = build(model, train).eval()
    reported = evaluate(qmodel, test)["accuracy"]

    path = tmp_path / "model.qready"
    save_packed(qmodel, path, meta={"model": MODEL["name"], "model_kwargs": MODEL["kwargs"]})
    n_act = len(read_packed_meta(path)["activations"])
    assert (n_act > 0) == (backend != "dkm-w3")
    reloaded = load_packed(path)
    x = next(iter(test))[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x)), "the reloaded packed model computes something else"
    packed = evaluate(reloaded, test)["accuracy"]
    assert packed == reported

    pytest.importorskip("onnx")
    from qready.export.onnx import export_onnx

    onnx_path = export_onnx(qmodel, x[:1], tmp_path / "model.onnx", w_bits=w_bits)
    runtime = _onnx_accuracy(onnx_path, test)
    print(f"{backend}: reported {reported:.2f} %, reloaded packed {packed:.2f} %, onnxruntime {runtime:.2f} %")
    assert runtime == pytest.approx(reported, abs=1e-9)


def test_one_bit_activations_are_refused_for_onnx(tmp_path) -> None:
    pytest.importorskip("onnx")
    from qready.export.onnx import export_onnx

    model = create_model("mlp", hidden=(8,), num_classes=3, in_features=4).eval()
    calib = [torch.randn(4, 4) for _ in range(2)]
    q = ptq(model, QuantSpec(bits=4), calib=calib, act_spec=QuantSpec(bits=1, granularity="tensor"))
    with pytest.raises(ValueError, match="1-bit .* use 2 or more activation bits"):
        export_onnx(q, calib[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
