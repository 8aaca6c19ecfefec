"""Two gloo processes on 127.0.0.1 train exactly like one process on the same global batch.

One spawn runs every scenario (plain training with gradient clipping, each registered regularizer,
a loss-dependent learnable term, a NaN on one rank only, label-free distillation with a range
regularizer, ``({"x": inputs}, targets)`` dict batches, an interrupted-and-resumed run); the parent
then trains each scenario in a single process on the union of the two ranks' batches and compares.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from qready.data import load_dataset, make_loaders
from qready.models import create_model
from qready.regularizers import build, list_regularizers
from qready.train import Distill, StandardStep, StepContext, StopTraining, TrainConfig, fit, load_checkpoint
from qready.train import distributed as qdist

WORLD = 2
SEED = 0
BATCH = 64  # the global batch: 32 per process
CFG = TrainConfig(epochs=3, batch_size=BATCH, optimizer="adam", lr=0.01, schedule="cosine", grad_clip=1.0)
REG_OPTIONS = {"grad_l1": {"act_weight": 0.05}, "cluster": {"bits": 2}}
SCENARIOS = ["plain", "loss_scale", "no_sync", "nan_on_one_rank", "distill", "dict_batches", *list_regularizers()]


class LossScale(nn.Module):
    """``t·loss`` with a learnable ``t``: its gradient is the local loss, so it differs per process."""

    name = "loss_scale"

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.5))

    def forward(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        return self.t * loss


class NaNOnRankOne:
    """NaN at the third step: on rank 1 only when distributed, on the global batch otherwise."""

    name = "nan_once"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        bad = self.calls == 3 and qdist.rank() == (1 if qdist.is_distributed() else 0)
        return torch.tensor(float("nan") if bad else 0.0)


class LocalPassFirst(StandardStep):
    """A throw-away forward/backward under ``ctx.no_sync()`` (gradients recorded, then dropped), then the
    standard synchronised step: the result must equal the standard step's."""

    def __init__(self) -> None:
        self.local: list[float] = []

    def step(self, ctx: StepContext) -> torch.Tensor:
        with ctx.no_sync():
            total, _ = ctx.compute_loss()
            total.backward()
        self.local.append(float(ctx.model.net[1].weight.grad.abs().sum()))
        return super().step(ctx)


def _splits():
    # 512 train samples: 8 steps of 64 per epoch (synthetic: no scikit-learn import in the workers)
    return load_dataset("synthetic", seed=SEED, num_samples=640, num_classes=4, noise=1.0)


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    return create_model("mlp", in_features=64, hidden=(32,), num_classes=4)  # no BatchNorm


def _terms(name: str, model: nn.Module) -> list:
    if name in ("plain", "dict_batches"):
        return []
    if name in ("loss_scale", "no_sync"):
        return [LossScale()]
    if name == "nan_on_one_rank":
        return [NaNOnRankOne()]
    if name == "distill":  # distillation alone would not move the weights: it starts at its minimum
        return [build("linf", model, weight=0.05)]
    return [build(name, model, weight=0.05, **REG_OPTIONS.get(name, {}))]


def _as_dict(samples: list) -> tuple[dict, torch.Tensor]:
    x, y = default_collate(samples)
    return {"x": x}, y  # model keyword arguments: the MLP's forward(x)


def _train(name: str, loader, **kwargs) -> dict:
    if name == "dict_batches":  # the same batches, as (dict, targets)
        loader = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=_as_dict)
    model = _model()
    objective = Distill(model) if name == "distill" else None  # the teacher is not wrapped in DDP
    terms = _terms(name, model)
    strategy = LocalPassFirst() if name == "no_sync" else None
    result = fit(model, loader, CFG, loss_terms=terms, step_strategy=strategy, objective=objective, seed=SEED,
                 progress=False, **kwargs)
    states = [t.state_dict() for t in terms if isinstance(t, nn.Module)]
    return {"model": {k: v.clone() for k, v in result.model.state_dict().items()},
            "terms": [{k: v.clone() for k, v in s.items()} for s in states],
            "history": json.dumps(result.history),
            "local_grads": torch.tensor(strategy.local if strategy else [])}


def _stop_after_first_epoch(epoch: int, metrics: dict, model: nn.Module) -> None:
    if epoch == 0:
        raise StopTraining


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert qdist.init_distributed("gloo") == torch.device("cpu")
    try:
        loader, _ = make_loaders(_splits(), BATCH, seed=SEED)
        assert isinstance(loader.sampler, DistributedSampler) and loader.batch_size == BATCH // WORLD
        with pytest.raises(ValueError, match="divisible by the number of processes"):
            make_loaders(_splits(), BATCH - 1, seed=SEED)
        results = {name: _train(name, loader) for name in SCENARIOS}
        run_dir = Path(out) / "run"
        _train("plain", loader, run_dir=run_dir, callbacks=[_stop_after_first_epoch])
        results["resumed"] = _train("plain", loader, run_dir=run_dir, resume=True)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        qdist.cleanup_distributed()


class GlobalBatches:
    """The union of what the two ranks' ``DistributedSampler``\\ s give at each step, as one batch."""

    def __init__(self, dataset, per_rank: int) -> None:
        self.samplers = [DistributedSampler(dataset, WORLD, r, shuffle=True, seed=SEED) for r in range(WORLD)]
        self.per_rank = per_rank

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.samplers[0]) // self.per_rank)

    def __iter__(self):
        parts = [list(s) for s in self.samplers]
        for start in range(0, len(parts[0]), self.per_rank):
            yield [i for p in parts for i in p[start:start + self.per_rank]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    splits = _splits()
    single = DataLoader(splits.train, batch_sampler=GlobalBatches(splits.train, BATCH // WORLD))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = {name: _train(name, single) for name in SCENARIOS}
    finally:
        torch.set_num_threads(before)
    return {"ranks": ranks, "reference": reference, "out": out}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


@pytest.mark.parametrize("name", SCENARIOS)
def test_ddp_equals_single_process_global_batch(runs: dict, name: str) -> None:
    r0, r1 = (r[name] for r in runs["ranks"])
    ref = runs["reference"][name]
    assert _max_diff(r0["model"], r1["model"]) == 0.0  # the ranks stay identical
    for t0, t1 in zip(r0["terms"], r1["terms"], strict=True):
        assert _max_diff(t0, t1) == 0.0
    init = _model().state_dict()
    moved = _max_diff(ref["model"], init)
    assert moved > 0.05  # training really changed the weights...
    assert _max_diff(r0["model"], ref["model"]) < 2e-5  # ...and DDP matches the global batch
    for t0, tr in zip(r0["terms"], ref["terms"], strict=True):
        assert _max_diff(t0, tr) < 2e-5
    h0, h1, href = (json.loads(h) for h in (r0["history"], r1["history"], ref["history"]))
    untimed = [[{k: v for k, v in m.items() if k != "time_s"} for m in h] for h in (h0, h1)]
    assert untimed[0] == untimed[1]  # every rank sees the same (reduced) metrics
    for a, b in zip(h0, href, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-9)
        assert a["skipped_steps"] == b["skipped_steps"]


def test_nan_on_one_rank_skips_the_step_on_every_rank(runs: dict) -> None:
    history = json.loads(runs["ranks"][1]["nan_on_one_rank"]["history"])
    assert [m["skipped_steps"] for m in history] == [1, 0, 0]


def test_learnable_term_parameter_is_averaged(runs: dict) -> None:
    # t's gradient is each rank's own loss; unsynchronised the ranks would drift apart.
    t_ranks = [float(r["loss_scale"]["terms"][0]["t"]) for r in runs["ranks"]]
    t_ref = float(runs["reference"]["loss_scale"]["terms"][0]["t"])
    assert t_ranks[0] == t_ranks[1] and t_ranks[0] == pytest.approx(t_ref, abs=1e-6) and t_ref != 0.5


def test_ddp_resume_matches_uninterrupted_and_rank0_writes(runs: dict) -> None:
    for rank in runs["ranks"]:
        assert _max_diff(rank["resumed"]["model"], rank["plain"]["model"]) == 0.0
    run_dir = runs["out"] / "run"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]  # written once, not once per rank
    ck = load_checkpoint(run_dir / "checkpoint")
    assert ck.epoch == 2 and len(ck.train_state["extra"]["rng_by_rank"]) == WORLD
    assert not any(k.startswith("module.") for k in ck.state_dict)  # the unwrapped module is saved
    assert _max_diff(ck.state_dict, runs["ranks"][0]["plain"]["model"]) == 0.0


def test_no_sync_keeps_gradients_local(runs: dict) -> None:
    local = [r["no_sync"]["local_grads"] for r in runs["ranks"]]
    assert local[0].numel() == 3 * 8 and not torch.equal(local[0], local[1])  # each rank's own batch
    assert _max_diff(runs["ranks"][0]["no_sync"]["model"], runs["ranks"][0]["loss_scale"]["model"]) == 0.0


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert qdist.init_distributed() is None and not qdist.is_distributed()
    assert (qdist.rank(), qdist.world_size(), qdist.is_main_process()) == (0, 1, True)
    model = _model()
    assert qdist.maybe_wrap_ddp(model, torch.device("cpu")) is model and qdist.unwrap(model) is model
    assert qdist.all_agree(False, torch.device("cpu")) is False
    assert qdist.gather_objects({"a": 1}) == [{"a": 1}] and qdist.broadcast_object(3) == 3
    loader, _ = make_loaders(_splits(), BATCH, seed=SEED)
    assert not qdist.is_sharded(loader)
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        make_loaders(_splits(), BATCH, seed=SEED, distributed=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"backend must be one of \['gloo', 'nccl'\]"):
        qdist.init_distributed("mpi")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        qdist.init_distributed()
