"""`qready run`: grids of experiments, cached stages, resuming after a crash, the report."""

import json
import shutil
import subprocess

import pytest
import yaml

from qready.app import stages as runner
from qready.app.cli import main
from qready.app.comparison import write_comparison
from qready.app.pipeline import expand_grid, run_recipe
from qready.recipe import RecipeError

RECIPE = {
    "name": "grid",
    "seed": 0,
    "model": {"name": "dwcnn", "args": {"width": 8}},
    "data": {"name": "synthetic", "options": {"num_samples": 320, "input_shape": [1, 8, 8], "num_classes": 4, "noise": 0.3}},
    "train": {"epochs": 2, "lr": 0.02, "batch_size": 64},
    "sweep": {"bits": [8, 2], "ranges": ["minmax"]},
    "grid": {"regularizers": [[], [{"name": "linf", "weight": 0.01}]]},
}


def _stages(events):
    return [(e, s, skipped) for e, s, skipped in events]


def test_grid_runs_end_to_end_and_caches(tmp_path):
    events = []
    root = run_recipe(RECIPE, tmp_path / "run", progress=False, on_stage=lambda *a: events.append(a))
    summaries = json.loads((root / "experiments.json").read_text())
    assert [s["id"] for s in summaries] == ["regularizers=none", "regularizers=linf@0.01"]
    report = (root / "report.md").read_text()
    assert "regularizers=none" in report and "regularizers=linf@0.01" in report
    assert (root / "report.html").is_file() and (root / "curves.png").is_file()
    assert all(not skipped for _, _, skipped in events)
    # a second run skips every finished stage
    events.clear()
    run_recipe(RECIPE, root, progress=False, on_stage=lambda *a: events.append(a))
    assert events and all(skipped for _, _, skipped in events)


def test_crash_then_resume_skips_finished_stages(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = runner.sweep_recipe

    def crashing(prepared, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(prepared, *a, **k)

    monkeypatch.setattr(runner, "sweep_recipe", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(RECIPE, tmp_path / "run", progress=False)
    monkeypatch.setattr(runner, "sweep_recipe", real)
    events = []
    run_recipe(RECIPE, tmp_path / "run", progress=False, on_stage=lambda *a: events.append(a))
    done = {(e, s): skipped for e, s, skipped in events}
    assert done[("regularizers=none", "train")] and done[("regularizers=none", "report")]
    assert done[("regularizers=linf@0.01", "train")]  # trained before the crash
    assert not done[("regularizers=linf@0.01", "sweep")]  # the stage that crashed is redone
    assert (tmp_path / "run" / "regularizers=linf@0.01" / "sweep.json").is_file()


def test_bad_grid_fails_before_training(tmp_path):
    bad = {**RECIPE, "grid": {"sweep.bits": [[8], [0]]}}
    with pytest.raises(RecipeError, match=r"bits=0.*sweep\.bits\[0\]"):
        run_recipe(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "bits=8").exists()
    with pytest.raises(RecipeError, match="grid"):
        expand_grid({**RECIPE, "grid": {"seed": 3}})


def test_cli_run_and_report(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    recipe = {k: v for k, v in RECIPE.items() if k != "grid"}
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert "W2 minmax" in capsys.readouterr().out
    (tmp_path / "one" / "report.html").unlink()
    assert main(["report", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (install Debian's 'chromium' package to run this check)")
    root = run_recipe({k: v for k, v in RECIPE.items() if k != "grid"}, tmp_path / "run", progress=False)
    write_comparison(root)
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", (root / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "id=\"results\"" in out and "<td>baseline</td>" in out
    assert 'data-images-loaded="2"' in out  # both embedded PNGs decoded by the browser


def test_compress_and_export_stages(tmp_path):
    recipe = {k: v for k, v in RECIPE.items() if k != "grid"}
    recipe["export"] = {"format": "packed"}
    recipe["grid"] = {"compress": [{"method": "lsq", "w_bits": 4, "a_bits": 8, "epochs": 1,
                                    "sharpness": {"kind": "saq", "rho": 0.2}},
                                   {"method": "kmeans", "w_bits": 2}]}
    root = run_recipe(recipe, tmp_path / "run", progress=False)
    summaries = {s["id"]: s for s in json.loads((root / "experiments.json").read_text())}
    assert set(summaries) == {"compress=lsq", "compress=kmeans"}
    for exp_id, s in summaries.items():
        row = s["compress"]["row"]
        assert 0.0 <= row["accuracy"] <= 100.0 and row["range"] == exp_id.split("=")[1]
        assert s["export"]["bytes"] > 0 and (root / exp_id / "export" / "model.qready").is_file()
        assert (root / exp_id / "weights.png").is_file()
    from qready.export import load_packed

    model = load_packed(root / "compress=kmeans" / "export" / "model.qready")
    w = model.features[1][0][0].weight
    assert w.unique().numel() <= 4  # 2-bit palette survived the round trip
    assert "compressed" in (root / "report.md").read_text()


# Which stages each recipe section feeds (directly or through an earlier stage).
DEPENDENTS = {
    "seed": {"train", "compress", "sweep", "export", "report"},
    "model": {"train", "compress", "sweep", "export", "report"},
    "data": {"train", "compress", "sweep", "export", "report"},
    "train": {"train", "compress", "sweep", "export", "report"},
    "regularizers": {"train", "compress", "sweep", "export", "report"},
    "sharpness": {"train", "compress", "sweep", "export", "report"},
    "compress": {"compress", "export", "report"},
    "sweep": {"sweep", "report"},
    "export": {"export", "report"},
}
CHANGES = {
    "seed": 1,
    "model": {"name": "dwcnn", "args": {"width": 16}},
    "data": {**RECIPE["data"], "options": {**RECIPE["data"]["options"], "noise": 0.4}},
    "train": {**RECIPE["train"], "lr": 0.01},
    "regularizers": [{"name": "linf", "weight": 0.01}],
    "sharpness": {"kind": "sam", "rho": 0.05},
    "compress": {"method": "kmeans", "w_bits": 3},
    "sweep": {"bits": [8, 3], "ranges": ["minmax"]},
    "export": {"format": "onnx"},
}


@pytest.mark.parametrize("section", sorted(DEPENDENTS))
def test_changing_a_section_reruns_exactly_its_dependent_stages(section):
    from qready.app.pipeline import stage_keys
    from qready.recipe import recipe_from_dict

    base = {k: v for k, v in RECIPE.items() if k != "grid"}
    base = {**base, "compress": {"method": "kmeans", "w_bits": 2}, "export": {"format": "packed"}}
    changed = {**base, section: CHANGES[section]}
    before, after = stage_keys(recipe_from_dict(base)), stage_keys(recipe_from_dict(changed))
    assert {stage for stage in before if before[stage] != after[stage]} == DEPENDENTS[section]


def test_new_export_format_does_not_redo_compression(tmp_path):
    recipe = {k: v for k, v in RECIPE.items() if k != "grid"}
    recipe = {**recipe, "compress": {"method": "kmeans", "w_bits": 2}, "export": {"format": "packed"}}
    root = run_recipe(recipe, tmp_path / "run", progress=False)
    assert (root / "export" / "model.qready").is_file()
    events = []
    run_recipe({**recipe, "export": {"format": "onnx"}}, root, progress=False,
               on_stage=lambda *a: events.append(a))
    rerun = {stage for _, stage, skipped in events if not skipped}
    assert rerun == {"export", "report"}
    assert json.loads((root / "export.json").read_text())["format"] == "onnx"


def test_sweep_uses_the_recipes_calib_batches():
    from dataclasses import replace

    from qready.recipe import recipe_from_dict

    data = {k: v for k, v in RECIPE.items() if k != "grid"}
    recipe = recipe_from_dict({**data, "sweep": {"bits": ["W8A8"], "ranges": ["minmax"], "calib_batches": 2}})
    prepared = runner.prepare(recipe)
    drawn = []

    class Counting:
        def __iter__(self):
            for batch in prepared.train_loader:
                drawn.append(1)
                yield batch

    runner.sweep_recipe(replace(prepared, train_loader=Counting()))
    assert len(prepared.train_loader) > 2 and len(drawn) == 2


def test_recipe_exports_to_core_ml(tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'qready[coreml]')")
    from qready.export.decode import read_coreml

    recipe = {k: v for k, v in RECIPE.items() if k != "grid"}
    recipe = {**recipe, "sweep": {"bits": [4], "ranges": ["minmax"]}, "export": {"format": "coreml", "bits": 4}}
    root = run_recipe(recipe, tmp_path / "run", progress=False)
    sizes = json.loads((root / "export.json").read_text())
    assert sizes["format"] == "coreml" and sizes["file"] == "model.mlpackage" and sizes["bytes"] > 0
    meta, stored = read_coreml(root / "export" / "model.mlpackage")
    # every weight stored as 4-bit per-channel integers (the recipe's grid), not as look-up tables
    assert stored and {(w.kind, w.bits) for w in stored.values()} == {("linear", 4)}


def test_core_ml_export_bits_are_checked():
    from qready.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="Core ML"):
        recipe_from_dict({"export": {"format": "coreml", "bits": 3}})


def test_mixed_precision_evidence_reaches_compress_json_and_the_report(tmp_path):
    recipe = {k: v for k, v in RECIPE.items() if k != "grid"}
    recipe = {**recipe, "sweep": {"bits": [8], "ranges": ["minmax"]},
              "compress": {"method": "lsq", "w_bits": 4, "a_bits": 4, "epochs": 1,
                           "options": {"mixed": {"search": "sensitivity", "bits": [2, 4, 8], "batches": 1}}}}
    root = run_recipe(recipe, tmp_path / "run", progress=False)
    mixed = json.loads((root / "compress.json").read_text())["mixed_precision"]
    assert mixed["search"] == "sensitivity" and mixed["bops"] <= mixed["target"]
    assert {r["bits"] for r in mixed["layers"]} <= {2, 4, 8}
    report = (root / "report.md").read_text()
    assert "## Mixed precision: main" in report and "Δ loss per bit width" in report
