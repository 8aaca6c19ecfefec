"""fit(): metrics/checkpoints, loss terms, step strategies, param groups, non-finite handling."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from train_testkit import make_data, make_loader, make_model, single_thread

from qready.train import (
    NonFiniteError,
    StandardStep,
    StepContext,
    StopTraining,
    TrainConfig,
    fit,
    load_checkpoint,
    load_model_weights,
)

FAST = TrainConfig(epochs=3, lr=0.05, schedule="none")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield



class Margin(nn.Module):
    """A loss term with a learnable parameter: pulls ``margin`` towards 2."""

    name = "margin"

    def __init__(self) -> None:
        super().__init__()
        self.margin = nn.Parameter(torch.zeros(()))

    def forward(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        return (self.margin - 2.0) ** 2


def test_fit_lowers_loss_and_writes_run_dir(tmp_path: Path) -> None:
    val = DataLoader(make_data(64, seed=1), batch_size=64)
    result = fit(make_model(), make_loader(), FAST, val_loader=val, run_dir=tmp_path, seed=0,
                 meta={"model": "linear", "data": {"name": "toy", "n": 128}}, progress=False)
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < losses[0]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert lines == result.history and result.final == lines[-1]
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "lr", "time_s", "grad_norm"):
        assert isinstance(lines[-1][key], float), key
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.meta["epoch"] == 2 and ck.meta["model"] == "linear" and ck.meta["data"]["n"] == 128
    assert ck.meta["metrics"] == lines[-1] and ck.meta["train_config"]["epochs"] == 3
    assert ck.train_state is not None and ck.train_state["optimizer"]["state"]
    loaded = make_model(seed=9)
    load_model_weights(tmp_path / "checkpoint", loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), result.model.parameters(), strict=True))


def test_logs_one_line_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qready.train"):
        fit(make_model(), make_loader(), FAST, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3 train_loss=")


def test_module_loss_term_parameter_is_optimized() -> None:
    term = Margin()
    result = fit(make_model(), make_loader(), FAST, loss_terms=[term], progress=False)
    assert 0.5 < float(term.margin.detach()) <= 2.5
    assert result.history[0]["term/margin"] > result.history[-1]["term/margin"]


def test_term_active_only_last_epoch() -> None:
    calls: list[int] = []

    class Late:
        name = "late"

        def active(self, epoch: int) -> bool:
            return epoch == 2

        def __call__(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
            calls.append(1)
            return torch.zeros(())

    result = fit(make_model(), make_loader(), FAST, loss_terms=[Late()], progress=False)
    assert len(calls) == 4  # 128 samples / 32 per batch, last epoch only
    assert ["term/late" in m for m in result.history] == [False, False, True]


def test_needs_graph_term_gets_loss_with_graph() -> None:
    class GradL1:
        name = "grad_l1"
        needs_graph = True

        def __call__(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
            assert loss is not None and loss.grad_fn is not None
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            return 0.01 * sum(g.abs().sum() for g in grads)

    result = fit(make_model(), make_loader(), FAST, loss_terms=[GradL1()], progress=False)
    assert result.history[-1]["term/grad_l1"] > 0


def test_custom_step_strategy_is_called() -> None:
    seen: list[tuple[int, int]] = []

    class Counting(StandardStep):
        def step(self, ctx: StepContext) -> torch.Tensor:
            seen.append((ctx.epoch, ctx.step))
            assert ctx.batch[0].shape[1:] == (4, 4)
            return super().step(ctx)

    fit(make_model(), make_loader(), FAST, step_strategy=Counting(), progress=False)
    assert seen == [(e, e * 4 + i) for e in range(3) for i in range(4)]


def test_two_pass_strategy() -> None:
    """A SAM-shaped strategy: perturb, second compute_loss, restore, step."""

    class TwoPass:
        def step(self, ctx: StepContext) -> torch.Tensor:
            ctx.optimizer.zero_grad()
            loss, _ = ctx.compute_loss()
            loss.backward()
            params = [p for p in ctx.params if p.grad is not None]
            eps = [0.05 * p.grad / (p.grad.norm() + 1e-12) for p in params]
            try:
                with torch.no_grad():
                    for p, e in zip(params, eps, strict=True):
                        p.add_(e)
                ctx.optimizer.zero_grad()
                loss2, _ = ctx.compute_loss()
                loss2.backward()
                ctx.log("sharp_gap", loss2 - loss)
            finally:
                with torch.no_grad():
                    for p, e in zip(params, eps, strict=True):
                        p.sub_(e)
            ctx.clip_gradients()
            ctx.optimizer.step()
            return loss.detach()

    result = fit(make_model(), make_loader(), FAST, step_strategy=TwoPass(), progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert "sharp_gap" in result.history[-1]


def test_param_groups_own_lr_and_dedupe() -> None:
    model = make_model()
    outside = nn.Parameter(torch.ones(3))  # e.g. a quantizer step size not registered in the model
    bias_before = model[1].bias.detach().clone()
    groups_seen: list[list[dict]] = []

    class Inspect(StandardStep):
        def step(self, ctx: StepContext) -> torch.Tensor:
            groups_seen.append(ctx.optimizer.param_groups)
            return super().step(ctx)

    def pull(model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        return (outside**2).sum()

    fit(model, make_loader(), FAST, loss_terms=[pull], step_strategy=Inspect(), progress=False,
        param_groups=[{"params": [model[1].bias], "lr": 0.0}, {"params": [outside], "lr": 0.2}])
    groups = groups_seen[0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 3
    assert [g["lr"] for g in groups] == [0.05, 0.0, 0.2]
    assert torch.equal(model[1].bias.detach(), bias_before)  # lr 0 group wins over the model group
    assert float(outside.detach().abs().max()) < 1.0


def test_param_groups_duplicates_rejected() -> None:
    model = make_model()
    w = model[1].weight
    with pytest.raises(ValueError, match=r"param_groups\[0\] and param_groups\[1\]"):
        fit(model, make_loader(), FAST, param_groups=[{"params": [w]}, {"params": [w]}], progress=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Crash(Exception):
    pass


@pytest.mark.parametrize(("seed", "interrupt"), [(0, "crash"), (0, "stop"), (None, "stop")])
def test_resume_is_bit_exact(tmp_path: Path, seed: int | None, interrupt: str) -> None:
    cfg = TrainConfig(epochs=4, lr=0.05, warmup_epochs=1, label_smoothing=0.1, weight_decay=1e-3)

    def run(run_dir: Path, callbacks=(), resume: bool = False, model_seed: int = 0):
        torch.manual_seed(7)  # the global RNG must start alike when fit is not seeded
        term = Margin()
        model = make_model(model_seed, dropout=0.2)
        loader = make_loader(generator_seed=model_seed + 123)
        res = fit(model, loader, cfg, loss_terms=[term], run_dir=run_dir, resume=resume, seed=seed,
                  callbacks=callbacks, progress=False)
        return res, term

    straight, term_a = run(tmp_path / "a")

    def interrupt_cb(epoch: int, metrics: dict, model: nn.Module) -> None:
        if epoch == 1:
            raise Crash() if interrupt == "crash" else StopTraining()

    if interrupt == "crash":
        with pytest.raises(Crash):
            run(tmp_path / "b", callbacks=[interrupt_cb])
        assert load_checkpoint(tmp_path / "b" / "checkpoint").meta["epoch"] == 0
    else:
        first, _ = run(tmp_path / "b", callbacks=[interrupt_cb])
        assert first.stopped_early and len(first.history) == 2
    # a fresh process: different initial weights and loader generator state
    resumed, term_b = run(tmp_path / "b", resume=True, model_seed=1 if seed is not None else 0)

    a, b = _state(straight.model), _state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(term_a.margin, term_b.margin)
    strip = [{k: v for k, v in m.items() if k != "time_s"} for m in straight.history]
    assert strip == [{k: v for k, v in m.items() if k != "time_s"} for m in resumed.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


def test_resume_finished_run_and_missing_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qready.train"):
        first = fit(make_model(), make_loader(), FAST, run_dir=tmp_path, resume=True, progress=False)
    assert "no checkpoint" in caplog.text and len(first.history) == 3
    calls: list[int] = []
    again = fit(make_model(seed=3), make_loader(), FAST, run_dir=tmp_path, resume=True, progress=False,
                callbacks=[lambda e, m, model: calls.append(e)])
    assert calls == [] and again.history == first.history
    assert torch.equal(again.model[1].weight, first.model[1].weight)


def test_resume_requires_run_dir() -> None:
    with pytest.raises(ValueError, match="run_dir"):
        fit(make_model(), make_loader(), FAST, resume=True, progress=False)


class NaNOnce:
    """Returns NaN on one global step, 0 otherwise."""

    name = "nan_once"

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(float("nan") if self.calls - 1 == self.at else 0.0)


def test_nonfinite_skip(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qready.train"):
        result = fit(make_model(), make_loader(), FAST, loss_terms=[NaNOnce(at=5)], progress=False)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert [m["skipped_steps"] for m in result.history] == [0, 1, 0]
    assert "loss term 'nan_once'=nan" in caplog.text and "skipping this update" in caplog.text


def test_nonfinite_gradient_is_skipped() -> None:
    def sqrt_at_zero(model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sqrt((model[1].weight * 0).sum())  # value 0, gradient NaN

    cfg = TrainConfig(epochs=1, lr=0.05, schedule="none", grad_clip=1.0)
    result = fit(make_model(), make_loader(), cfg, loss_terms=[sqrt_at_zero], progress=False)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.history[0]["skipped_steps"] == 4


def test_nonfinite_stop_keeps_last_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, lr=0.05, schedule="none", nonfinite="stop")
    with pytest.raises(NonFiniteError, match="nonfinite='stop'"):
        fit(make_model(), make_loader(), cfg, loss_terms=[NaNOnce(at=5)], run_dir=tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.meta["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in ck.state_dict.values())


def test_diverged_weights_never_checkpointed(tmp_path: Path) -> None:
    class Poison(StandardStep):
        def step(self, ctx: StepContext) -> torch.Tensor:
            out = super().step(ctx)
            if ctx.epoch == 1:
                with torch.no_grad():
                    ctx.model[1].weight.fill_(float("inf"))
            return out

    with pytest.raises(NonFiniteError, match=r"'1\.weight'"):
        fit(make_model(), make_loader(), FAST, step_strategy=Poison(), run_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint").meta["epoch"] == 0


def test_meta_validation() -> None:
    with pytest.raises(ValueError, match="reserved"):
        fit(make_model(), make_loader(), FAST, meta={"epoch": 1}, progress=False)
    with pytest.raises(TypeError, match="JSON"):
        fit(make_model(), make_loader(), FAST, meta={"x": object()}, progress=False)


def test_callbacks_see_metrics_and_may_add(tmp_path: Path) -> None:
    seen: list[int] = []

    def cb(epoch: int, metrics: dict, model: nn.Module) -> None:
        seen.append(epoch)
        metrics["extra"] = torch.tensor(1.5)

    fit(make_model(), make_loader(), FAST, callbacks=[cb], run_dir=tmp_path, progress=False)
    assert seen == [0, 1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["extra"] == 1.5
