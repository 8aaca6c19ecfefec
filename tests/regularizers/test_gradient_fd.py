"""Gradient-ℓ1 in finite-difference mode: agreement with double backprop (float64, BatchNorm in train
mode, default ε = √(machine ε)·(1 + ‖W‖₂)/√N, i.e. r = 1.5e-8), λ = 0 and inactive epochs are plain
steps, BatchNorm statistics and the random stream are those of one plain pass, DDP equals one process."""

from __future__ import annotations

import copy
import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qready.regularizers import GradL1
from qready.regularizers.gradient_fd import GradL1Step, relative_step, step_size
from qready.train import StepContext
from qready.train.distributed import cleanup_distributed


def _cnn(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 5 * 5, 3),
    ).double().train()


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _exact_gradients(model, x, y, **options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(∇L, ∇(L + penalty))`` by double backprop, for every parameter."""
    reg = GradL1(model, **{k: v for k, v in options.items() if k not in ("central", "fd_eps")})
    params = list(model.parameters())
    state = torch.get_rng_state()
    loss = F.cross_entropy(model(x), y)
    plain = torch.autograd.grad(loss, params, retain_graph=True)
    total = torch.autograd.grad(loss + reg(model, loss=loss), params)
    reg.remove()
    torch.set_rng_state(state)
    return list(plain), list(total)


def _fd_gradients(model, x, y, **options) -> list[torch.Tensor]:
    """The gradients :meth:`GradL1.step` hands to the optimizer (lr = 0: the weights do not move)."""
    reg = GradL1(model, mode="finite_difference", **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    reg.step(model, closure, opt)
    reg.remove()
    return [p.grad.clone() for p in model.parameters()]


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    u, v = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("options", [
    {"weight": 0.5},
    {"weight": 0.5, "central": True},
    {"weight": 0.5, "normalize": "numel"},
    {"weight": 0.5, "act_weight": 0.2},
    {"weight": 0.0, "act_weight": 0.3, "act_site": "input"},
    {"weight": 0.5, "act_weight": 0.2, "normalize": "numel"},
])
def test_penalty_gradient_matches_double_backprop(options):
    model, (x, y) = _cnn(), _batch()
    torch.manual_seed(3)
    plain, exact = _exact_gradients(model, x, y, **options)
    fd = _fd_gradients(model, x, y, **options)
    penalty_exact = [e - p for e, p in zip(exact, plain, strict=True)]
    penalty_fd = [f - p for f, p in zip(fd, plain, strict=True)]
    assert _cosine(penalty_fd, penalty_exact) >= 0.99
    norm_ratio = torch.cat([t.reshape(-1) for t in penalty_fd]).norm() / torch.cat(
        [t.reshape(-1) for t in penalty_exact]).norm()
    assert 0.95 < float(norm_ratio) < 1.05


def test_dropout_masks_are_shared_by_both_passes():
    model, (x, y) = _cnn(dropout=0.5), _batch()
    torch.manual_seed(5)
    plain, exact = _exact_gradients(model, x, y, weight=0.5)
    torch.manual_seed(5)
    fd = _fd_gradients(model, x, y, weight=0.5)
    after_fd = torch.rand(3)
    torch.manual_seed(5)
    model(x)
    after_plain = torch.rand(3)
    assert torch.equal(after_fd, after_plain), "the step must advance the random stream like one pass"
    penalty = [[f - p for f, p in zip(g, plain, strict=True)] for g in (fd, exact)]
    assert _cosine(*penalty) >= 0.99


def test_float32_gradient_is_close():
    model, (x, y) = _cnn().float(), _batch()
    x = x.float()
    plain, exact = _exact_gradients(model, x, y, weight=0.5)
    fd = _fd_gradients(model, x, y, weight=0.5)
    penalty = [[f - p for f, p in zip(g, plain, strict=True)] for g in (fd, exact)]
    assert _cosine(*penalty) >= 0.9


def test_step_size_rule():
    w = [torch.full((3, 4), 2.0), torch.full((4,), -2.0)]
    r = relative_step(torch.float32, central=False)
    assert r == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    assert relative_step(torch.float64, central=True) == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3))
    assert step_size(w, r) == pytest.approx(r * (1 + 2.0 * 4) / 4)


def test_batchnorm_statistics_and_weights_are_those_of_one_plain_pass():
    model, (x, y) = _cnn(), _batch()
    reference = copy.deepcopy(model)
    reference(x)  # one plain training forward: the statistics the step must leave
    reg = GradL1(model, weight=0.5, act_weight=0.1, mode="finite_difference", central=True)
    weights = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    reg.step(model, closure, torch.optim.SGD(model.parameters(), lr=0.0))
    for (name, got), want in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(got, want), name
    for got, want in zip(model.parameters(), weights, strict=True):
        assert torch.equal(got, want)
    assert reg.last_penalty is not None and reg.last_penalty > 0


def _loop_step(model, reg_or_none, epoch=0):
    """One StepContext step with GradL1Step (or the standard step); returns the new weights."""
    from qready.train import StandardStep

    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def compute_loss():
        loss = F.cross_entropy(model(x), y)
        return loss, {"task": loss.detach()}

    ctx = StepContext(model=model, batch=(x, y), optimizer=opt, compute_loss=compute_loss, epoch=epoch, step=0)
    strategy = GradL1Step(reg_or_none) if reg_or_none is not None else StandardStep()
    strategy.step(ctx)
    return [p.detach().clone() for p in model.parameters()], ctx.logs


def test_lambda_zero_and_inactive_epochs_are_plain_steps():
    plain, _ = _loop_step(_cnn(), None)
    zero_model = _cnn()
    zero, _ = _loop_step(zero_model, GradL1(zero_model, weight=0.0, mode="finite_difference"))
    late_model = _cnn()
    late, _ = _loop_step(late_model, GradL1(late_model, weight=1.0, start_epoch=2, mode="finite_difference"))
    on_model = _cnn()
    on, logs = _loop_step(on_model, GradL1(on_model, weight=1.0, mode="finite_difference"))
    for a, b, c in zip(plain, zero, late, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, on, strict=True))
    assert logs["grad_l1"] > 0 and logs["grad_norm"] > 0


def test_errors_are_clear():
    model = _cnn()
    with pytest.raises(ValueError, match="mode"):
        GradL1(model, mode="fd")
    with pytest.raises(ValueError, match="fd_eps"):
        GradL1(model, mode="finite_difference", fd_eps=2.0)
    with pytest.raises(ValueError, match="finite_difference"):
        GradL1(model, central=True)
    fd = GradL1(model, mode="finite_difference")
    x, y = _batch()
    with pytest.raises(RuntimeError, match="not a loss term"):
        fd(model, loss=F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="exact"):
        GradL1(model).step(model, lambda: None, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="finite_difference"):
        GradL1Step(GradL1(model))


# --- DDP: two processes on halves of the batch equal one process on the whole batch ---------------

LR = 0.1
OPTIONS = {"weight": 0.5, "act_weight": 0.2}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _one_step(net: nn.Module, model: nn.Module, x, y) -> list[torch.Tensor]:
    reg = GradL1(model, mode="finite_difference", **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    reg.step(model, closure, opt)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _global_batch()
        ddp = DistributedDataParallel(_mlp())
        result = _one_step(ddp, ddp.module, x[8 * rank: 8 * (rank + 1)], y[8 * rank: 8 * (rank + 1)])
        if rank == 0:
            torch.save(result, out)
        ddp = None  # drop the reducer before leaving the group
    finally:
        cleanup_distributed()


def test_ddp_equals_single_process(tmp_path: Path) -> None:
    out = str(tmp_path / "rank0.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = _mlp()
    want = _one_step(model, model, *_global_batch())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    plain = _mlp()
    assert any(not torch.allclose(a, p, atol=1e-5) for a, p in zip(got, plain.parameters(), strict=True))


def test_recipe_trains_with_the_finite_difference_step(tmp_path: Path) -> None:
    from qready.app.stages import train_recipe
    from qready.recipe import load_recipe

    recipe = load_recipe({
        "name": "fd", "seed": 0, "model": {"name": "mlp", "args": {"hidden": [16]}},
        "data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 256, "lr": 0.01},
        "regularizers": [{"name": "grad_l1", "weight": 1.0, "options": {"mode": "finite_difference"}}],
    })
    train_recipe(recipe, tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"grad_l1"' in lines[-1]  # logged by the step strategy
