"""``synthetic`` Gaussian clusters: shapes, determinism and learnability."""

from __future__ import annotations

import torch

from qready.data import load_dataset


def test_shapes_and_labels() -> None:
    splits = load_dataset("synthetic", num_samples=100, input_shape=[2, 3, 5], num_classes=3)
    assert splits.input_shape == (2, 3, 5) and splits.num_classes == 3 and splits.name == "synthetic"
    x, y = splits.train.tensors
    assert len(splits.train) == 80 and len(splits.test) == 20
    assert x.shape == (80, 2, 3, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2}


def test_deterministic_from_seed() -> None:
    a, b, c = (load_dataset("synthetic", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_learnable_by_linear_model() -> None:
    splits = load_dataset("synthetic", seed=0)
    x, y = splits.train.tensors
    torch.manual_seed(0)
    model = torch.nn.Linear(x[0].numel(), splits.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
    with torch.no_grad():
        train_acc = (model(x.flatten(1)).argmax(1) == y).float().mean().item()
        x_te, y_te = splits.test.tensors
        test_acc = (model(x_te.flatten(1)).argmax(1) == y_te).float().mean().item()
    assert train_acc > 0.8
    assert test_acc > 0.8
