"""DDP (2 processes, gloo, CPU): the ascent pass does not all-reduce (m-sharpness), the descent pass
does, and the update equals the single-process average of per-half-batch SAM/SAQ gradients."""

from __future__ import annotations

import copy
import datetime
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from qready.quant import prepare_qat
from qready.sharpness import SAM, SAQ, SAMStep
from qready.train import StepContext
from qready.train.distributed import cleanup_distributed

RHO, LR = 0.2, 0.1


def make_float(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def make_qat() -> nn.Module:
    return prepare_qat(make_float(1), method="lsq", w_bits=3, a_bits=4, calib=[global_batch()[0]])


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def half(r: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch()
    return x[8 * r: 8 * (r + 1)], y[8 * r: 8 * (r + 1)]


class Counter:
    calls = 0


def counting_hook(state: Counter, bucket):
    state.calls += 1
    return default_hooks.allreduce_hook(None, bucket)


def wrap(model: nn.Module) -> tuple[DistributedDataParallel, Counter]:
    ddp = DistributedDataParallel(model)
    counter = Counter()
    ddp.register_comm_hook(counter, counting_hook)
    return ddp, counter


def ce_closure(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    x, y = half(rank)
    results: dict[str, object] = {}
    try:
        # one plain synchronised backward: how many all-reduce calls (buckets) it makes
        ddp, counter = wrap(make_float())
        nn.functional.cross_entropy(ddp(x), y).backward()
        per_backward = counter.calls

        ddp, counter = wrap(make_float())
        opt = SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, model=ddp)
        opt.step(ce_closure(ddp, x, y))
        results["sam"] = [p.detach().clone() for p in ddp.module.parameters()]
        results["sam_calls"] = counter.calls

        ddp, counter = wrap(make_float())
        model = ddp.module
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def compute_loss():
            loss = nn.functional.cross_entropy(ddp(x), y)
            return loss, {"task": loss.detach()}

        ctx = StepContext(model=model, batch=(x, y), optimizer=opt, compute_loss=compute_loss, epoch=0, step=0,
                          net=ddp)
        SAMStep(rho=RHO).step(ctx)
        results["samstep"] = [p.detach().clone() for p in model.parameters()]
        results["samstep_calls"] = counter.calls

        ddp, counter = wrap(make_qat())
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        SAQ(ddp, rho=RHO).step(ce_closure(ddp, x, y), opt)
        results["saq"] = [p.detach().clone() for p in ddp.module.parameters()]
        results["saq_calls"] = counter.calls
        results["per_backward"] = per_backward
        if rank == 0:
            torch.save(results, out)
        ddp = model = opt = None  # drop the DDP reducers before leaving the group
    finally:
        cleanup_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sam_reference() -> list[torch.Tensor]:
    """SGD on the mean over the two halves of grad L_h(w + rho g_h/||g_h||), g_h = grad L_h(w)."""
    model = make_float()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for r in range(2):
        x, y = half(r)
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p.add_(RHO * t / norm)
        g2 = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)
        total = [a + b / 2 for a, b in zip(total, g2, strict=True)]
    return [w - LR * g for w, g in zip(w0, total, strict=True)]


def saq_reference() -> list[torch.Tensor]:
    """The same average for SAQ: per half, the perturbation of Q(w) from that half's dL/dQ(w)."""
    base = make_qat()
    total = None
    for r in range(2):
        model = copy.deepcopy(base)
        saq = SAQ(model, rho=RHO)
        x, y = half(r)
        with saq.ascent():
            nn.functional.cross_entropy(model(x), y).backward()
        saq.perturb()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        saq.restore()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        total = grads if total is None else [(a + b) / 2 for a, b in zip(total, grads, strict=True)]
    return [p.detach() - LR * g for p, g in zip(base.parameters(), total, strict=True)]


def test_two_process_sam_and_saq_match_the_per_half_average(tmp_path: Path) -> None:
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    per_backward = results["per_backward"]
    assert per_backward >= 1
    for key in ("sam_calls", "samstep_calls", "saq_calls"):
        assert results[key] == per_backward, key  # the ascent pass made no all-reduce call
    for key, ref in (("sam", sam_reference()), ("samstep", sam_reference()), ("saq", saq_reference())):
        for got, want in zip(results[key], ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # m-sharpness matters: the global-batch SAM update differs from the per-half average
    model = make_float()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    opt.step(ce_closure(model, *global_batch()))
    assert any(not torch.allclose(p, r, atol=1e-5) for p, r in zip(model.parameters(), sam_reference(), strict=True))
