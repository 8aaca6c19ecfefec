"""CLI failures: one line on stderr, exit code 2, naming the cause (file, key, layer); runs never
overwrite each other; exports use the run's own bit widths and honour --out."""

from __future__ import annotations

import json

import pytest
import yaml

from qready.app.cli import main

TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "dwcnn", "args": {"width": 8}},
    "data": {"name": "digits"},
    "train": {"epochs": 1, "lr": 0.01, "batch_size": 64},
    "sweep": {"bits": [8, 4], "ranges": ["minmax"]},
}


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI, expecting exit 2 and one stderr line holding every ``expected`` string."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    run = root / "run"
    assert main(["train", str(recipe), "--out", str(run), "--no-progress"]) == 0
    return recipe, run


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: dwcnn\n")
    _fails(capsys, ["train", str(bad)], str(bad), "not valid YAML at line")
    _fails(capsys, ["run", str(bad)], str(bad), "not valid YAML")


def test_unknown_model_argument_names_the_key_and_creates_nothing(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "model": {"name": "dwcnn", "args": {"widht": 8}}}))
    _fails(capsys, ["train", str(recipe), "--out", str(tmp_path / "run")], "model.args", "'widht'")
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "x", "--bits", "four"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected comma-separated integers" in err and "<lambda>" not in err


def test_a_file_given_for_a_checkpoint_directory(tmp_path, capsys) -> None:
    model = tmp_path / "model.qready"
    model.write_bytes(b"x")
    _fails(capsys, ["sweep", str(model)], f"{model} is a file, not a checkpoint directory")


def test_a_finished_run_is_not_restarted_silently(trained, capsys) -> None:
    recipe, run = trained
    metrics = (run / "metrics.jsonl").read_text()
    _fails(capsys, ["train", str(recipe), "--out", str(run), "--no-progress"], "already holds a run", "--resume",
           "--force")
    assert (run / "metrics.jsonl").read_text() == metrics  # untouched


def test_a_run_in_progress_is_refused(trained, capsys, tmp_path) -> None:
    from qready.app.rundir import run_lock

    recipe, _ = trained
    with run_lock(tmp_path / "busy"):
        _fails(capsys, ["train", str(recipe), "--out", str(tmp_path / "busy"), "--no-progress"],
               "is in use by another qready run")


def test_corrupt_training_state_does_not_block_weight_only_commands(trained, tmp_path, capsys) -> None:
    import shutil

    _, run = trained
    copy = tmp_path / "checkpoint"
    shutil.copytree(run / "checkpoint", copy)
    state = copy / "train_state.pt"
    if state.exists():
        state.write_bytes(b"garbage")
    out = tmp_path / "exported" / "m.qready"
    assert main(["export", str(copy), "--out", str(out)]) == 0
    assert out.is_file()


def test_export_honours_out_and_checks_flags(trained, tmp_path, capsys) -> None:
    _, run = trained
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    out = tmp_path / "elsewhere" / "model.onnx"
    assert main(["export", str(run / "checkpoint"), "--format", "onnx", "--bits", "8", "--a-bits", "8",
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written next to the checkpoint
    _fails(capsys, ["export", str(run / "checkpoint"), "--format", "onnx", "--a-bits", "1", "--out", str(out)],
           "--a-bits")
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["export", str(run / "checkpoint"), "--out", str(tmp_path / "file" / "x" / "m.qready")],
           "is not writable")


def test_sweep_json_into_an_unwritable_place_fails_before_the_sweep(trained, tmp_path, capsys) -> None:
    _, run = trained
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["sweep", str(run / "checkpoint"), "--json", str(tmp_path / "file" / "rows.json")],
           "is not writable")


def test_json_of_a_sweep_is_strict(trained, tmp_path) -> None:
    _, run = trained
    path = tmp_path / "rows.json"
    assert main(["sweep", str(run / "checkpoint"), "--bits", "4", "--json", str(path)]) == 0
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_a_corrupt_cifar_batch_names_the_file(tmp_path, capsys) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(bytes(range(256)) * 4)
    recipe = tmp_path / "c.yaml"
    recipe.write_text(yaml.safe_dump({"name": "c", "model": {"name": "resnet20"},
                                      "data": {"name": "cifar10", "root": str(tmp_path)}, "train": {"epochs": 1}}))
    _fails(capsys, ["train", str(recipe), "--out", str(tmp_path / "run")], str(folder / "data_batch_1"))


def test_run_with_an_unknown_model_argument_creates_nothing(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "model": {"name": "dwcnn", "args": {"depth": 3}}}))
    _fails(capsys, ["run", str(recipe), "--out", str(tmp_path / "run")], "model.args", "'depth'")
    assert not (tmp_path / "run").exists()
