"""The command line: train -> sweep on a tiny recipe, the demo, and clear errors."""

import json

import pytest
import yaml

from qready.app.cli import main

TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "dwcnn", "args": {"width": 8}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64},
    "sweep": {"bits": [8, 4, "W8A8"], "ranges": ["minmax"]},
}


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_train_then_sweep(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(run), "--no-progress"]) == 0
    assert (run / "checkpoint" / "model.safetensors").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "val_acc" in json.loads(lines[-1])
    out_json = tmp_path / "rows.json"
    assert main(["sweep", str(run / "checkpoint"), "--bits", "8,3", "--range", "minmax,mse", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["label"] for r in rows] == ["FP", "W8", "W3", "W8", "W3"]
    assert "W3" in capsys.readouterr().out
    corrected = tmp_path / "corrected.json"
    assert main(["sweep", str(run / "checkpoint"), "--bits", "3", "--range", "minmax", "--bias-correction", "model",
                 "--json", str(corrected)]) == 0
    w3 = json.loads(corrected.read_text())[1]
    assert w3["label"] == "W3" and w3["kl"] != rows[2]["kl"]  # the correction changed the quantized model


def test_demo_writes_a_run_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo plots accuracy vs bits with matplotlib (the plots extra)")
    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    for name in ("report.md", "sweep.json", "accuracy_vs_bits.png", "metrics.jsonl", "recipe.yaml"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "| range | FP | W8 |" in report and "| mse |" in report
    assert "W2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sweep", "CKPT", "--bits", "8,9"], "9"),
        (["sweep", "CKPT", "--bits", "four"], "four"),
        (["sweep", "MISSING"], "MISSING"),
    ],
)
def test_sweep_errors(tmp_path, recipe_file, capsys, args, needle):
    run = tmp_path / "run"
    main(["train", str(recipe_file), "--out", str(run), "--no-progress", "--set", "train.epochs=1"])
    args = [a.replace("CKPT", str(run / "checkpoint")).replace("MISSING", str(tmp_path / "MISSING")) for a in args]
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_recipe_errors_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "model": {"name": "resnet9000"}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "resnet20" in err
    assert not (tmp_path / "r").exists()


def test_corrupted_checkpoint_names_the_file(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    main(["train", str(recipe_file), "--out", str(run), "--no-progress", "--set", "train.epochs=1"])
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["sweep", str(run / "checkpoint")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_export_packed_and_onnx(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    main(["train", str(recipe_file), "--out", str(run), "--no-progress", "--set", "train.epochs=1"])
    assert main(["export", str(run / "checkpoint"), "--bits", "2"]) == 0
    assert (run / "model_w2.qready").is_file()
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra (onnx)")
    assert main(["export", str(run / "checkpoint"), "--format", "onnx", "--bits", "8", "--a-bits", "8"]) == 0
    graph = onnx.load(str(run / "model_w8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"DequantizeLinear", "QuantizeLinear"} <= ops
    assert main(["export", str(run / "checkpoint"), "--bits", "9"]) == 2
    assert "--bits" in capsys.readouterr().err
