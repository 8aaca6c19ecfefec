"""Runs that go wrong: SIGKILL mid-epoch, malicious or broken checkpoint files, losses that turn NaN.

The kill test drives the real command line in subprocesses (``python -m qready train``) on one CPU
thread. The run to kill announces (a marker file) that it has reached the sixth step of its second
epoch and waits there; it is killed with SIGKILL at that event, resumed with ``--resume`` and its final
``model.safetensors`` compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_testkit import make_loader, make_model

from qready.train import (
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    fit,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)

RECIPE = """\
name: kill_test
seed: 3
model: {name: dwcnn, args: {width: 8}}
data: {name: digits}
train: {epochs: 4, optimizer: adam, lr: 0.01, batch_size: 16, schedule: cosine}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 240


def _train_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qready", "train", str(recipe), "--out", str(out), "--no-progress", *extra]


# The run to kill: the command line, with the default step made to stop at step 6 of epoch 2 (0-based
# epoch 1) after writing the marker file -- it is killed there.
VICTIM = """\
import pathlib, sys, time
from qready.train import step as step_module
recipe, out, marker = sys.argv[1:4]
original = step_module.StandardStep.step
seen = []
def step(self, ctx):
    if ctx.epoch == 1:
        seen.append(ctx.step)
        if len(seen) == 6:
            pathlib.Path(marker).touch()
            time.sleep(3600)
    return original(self, ctx)
step_module.StandardStep.step = step
from qready.app.cli import main
sys.exit(main(["train", recipe, "--out", out, "--no-progress"]))
"""


def _wait(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"qready train failed ({proc.returncode}):\n{out}\n{err}"


def _metrics(run: Path) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (a line being appended right now is left out)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def _epochs_logged(run: Path) -> list[int]:
    return [m["epoch"] for m in _metrics(run)]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = subprocess.Popen(_train_cmd(recipe, full), env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "victim_paused"
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(recipe), str(killed), str(marker)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists() and victim.poll() is None, \
            f"the run to kill never reached epoch 2: {victim.stderr.read() if victim.poll() is not None else ''}"
        assert _epochs_logged(killed) == [0]  # paused inside the second epoch
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.stderr.close()
    assert load_checkpoint(killed / "checkpoint").epoch < 3  # it really was interrupted
    _wait(reference)
    resumed = subprocess.Popen(_train_cmd(recipe, killed, "--resume"), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait(resumed)

    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(killed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _epochs_logged(killed) == [0, 1, 2, 3] == _epochs_logged(full)
    assert not list(killed.glob(".checkpoint*"))  # no temporary or backup directory left behind


# ------------------------------------------------------------------------------------ safe files


class _Payload:
    """Unpickling this runs code: it writes ``side`` (the side effect the tests look for)."""

    def __init__(self, side: Path) -> None:
        self.side = side

    def __reduce__(self):
        return (exec, (f"open({str(self.side)!r}, 'w').write('pwned')",))


def _rewrite_with_matching_meta(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and fix its size/sha256 in meta.json, as an attacker would."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _small_run(run: Path) -> None:
    fit(make_model(), make_loader(), TrainConfig(epochs=1, lr=0.05), run_dir=run, seed=0, progress=False)


def test_malicious_pickle_in_train_state_is_refused_not_executed(tmp_path: Path) -> None:
    run, side = tmp_path / "run", tmp_path / "side_effect.txt"
    _small_run(run)
    ckpt = run / "checkpoint"
    evil = tmp_path / "evil.pt"
    torch.save({"optimizer": _Payload(side), "scheduler": None, "extra": {}}, evil)
    _rewrite_with_matching_meta(ckpt, "train_state.pt", evil.read_bytes())

    with pytest.raises(CheckpointError, match=r"train_state\.pt"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"train_state\.pt"):
        fit(make_model(), make_loader(), TrainConfig(epochs=2, lr=0.05), run_dir=run, resume=True, progress=False)
    assert not side.exists()
    # The payload is real: a full unpickle would have run it.
    torch.load(evil, weights_only=False)
    assert side.read_text() == "pwned"


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "qready"
    calls = [(p, line) for p in src.rglob("*.py") for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls, "expected the checkpoint reader to use torch.load"
    assert all("weights_only=True" in line for _, line in calls), calls


def test_resume_into_mismatched_model_names_file_and_tensor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _small_run(run)
    wider = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))  # 5 classes instead of 4
    with pytest.raises(CheckpointError, match=r"(?s)model\.safetensors.*1\.weight.*torch\.Size\(\[4, 16\]\)"):
        fit(wider, make_loader(), TrainConfig(epochs=2), run_dir=run, resume=True, progress=False)
    deeper = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match=r"(?s)model\.safetensors.*Missing key.*2\.weight"):
        load_model_weights(run / "checkpoint", deeper)


def test_truncated_files_name_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _small_run(run)
    ckpt = run / "checkpoint"
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(ckpt)
    _rewrite_with_matching_meta(ckpt, "model.safetensors", weights[: len(weights) // 2])  # checksums agree
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read as safetensors"):
        load_checkpoint(ckpt)
    _rewrite_with_matching_meta(ckpt, "model.safetensors", weights)
    state = (ckpt / "train_state.pt").read_bytes()
    _rewrite_with_matching_meta(ckpt, "train_state.pt", state[:100])
    with pytest.raises(CheckpointError, match=r"train_state\.pt cannot be loaded"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------- NaN guard


class NaNFrom:
    """A loss term that is 0 for the first ``start`` calls and NaN from then on."""

    name = "nan_from"

    def __init__(self, start: int) -> None:
        self.start, self.calls = start, 0

    def __call__(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(float("nan") if self.calls > self.start else 0.0)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_loss_turning_nan_never_corrupts_the_checkpoint(tmp_path: Path, policy: str) -> None:
    cfg = TrainConfig(epochs=3, lr=0.05, nonfinite=policy)  # 4 steps per epoch: NaN from epoch 2, step 2
    after_first: dict[str, torch.Tensor] = {}

    def keep(epoch: int, metrics: dict, model: nn.Module) -> None:
        if epoch == 0:
            after_first.update({k: v.clone() for k, v in model.state_dict().items()})

    term = NaNFrom(start=5)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="untouched"):
            fit(make_model(), make_loader(), cfg, loss_terms=[term], run_dir=tmp_path, callbacks=[keep], progress=False)
        expected_epoch = 0
    else:
        result = fit(make_model(), make_loader(), cfg, loss_terms=[term], run_dir=tmp_path, callbacks=[keep],
                     progress=False)
        assert [m["skipped_steps"] for m in result.history] == [0, 3, 4]
        expected_epoch = 2
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.epoch == expected_epoch and _finite(ck.state_dict)
    assert all(math.isfinite(float(v)) for v in ck.state_dict["1.weight"].flatten())
    if policy == "stop":
        assert all(torch.equal(ck.state_dict[k], after_first[k]) for k in after_first)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_exploding_learning_rate_never_corrupts_the_checkpoint(tmp_path: Path, policy: str) -> None:
    # At epoch 1 the lr jumps from 1 to 1e38: the logits overflow and the loss turns NaN/Inf for real.
    cfg = TrainConfig(epochs=3, optimizer="sgd", lr=1.0, schedule="step", milestones=(1,), gamma=1e38,
                      nonfinite=policy)
    try:
        result = fit(make_model(), make_loader(), cfg, run_dir=tmp_path, progress=False)
        diverged = any(m["skipped_steps"] for m in result.history)
    except NonFiniteError as e:
        assert "untouched" in str(e)
        diverged = True
    assert diverged
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert _finite(ck.state_dict)
    assert all(_finite(s) for s in ck.train_state["optimizer"]["state"].values())


def test_weights_made_nan_by_a_callback_are_not_saved(tmp_path: Path) -> None:
    def poison(epoch: int, metrics: dict, model: nn.Module) -> None:
        if epoch == 1:
            with torch.no_grad():
                model[1].bias.fill_(float("nan"))

    with pytest.raises(CheckpointError, match=r"non-finite weights.*1\.bias"):
        fit(make_model(), make_loader(), TrainConfig(epochs=3), run_dir=tmp_path, callbacks=[poison], progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.epoch == 0 and _finite(ck.state_dict)
    save_checkpoint(tmp_path / "other", make_model(), meta={})  # the directory is still writable
