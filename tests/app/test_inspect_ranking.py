"""`inspect` ranks layers by the measured loss increase when it measured it (the first-order estimate
beside it), so its words never contradict its own table."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from qready.data import load_dataset
from qready.evaluate.inspect import diagnose
from qready.models import create_model


def _trained():
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = create_model("dwcnn", width=8, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), [b for _, b in zip(range(2), loader, strict=False)]


def test_rank_follows_the_measurement_and_the_estimate_stays_beside_it() -> None:
    model, batches = _trained()
    measured = diagnose(model, batches, bits=(4, 2))
    assert measured.ranked_by == "measured"
    by_rank = sorted(measured.layers, key=lambda layer: layer["rank"])
    increases = [layer["measured"][2] for layer in by_rank]
    assert increases == sorted(increases, reverse=True)
    worst = by_rank[0]
    assert worst["keep_higher"] and not any(worst["name"] in line and "safe here" in line
                                            for line in measured.recommend)
    assert any(f"keep {worst['name']}" in line and "measured ΔL=" in line and "estimate S=" in line
               for line in measured.recommend)
    header = [c.header for c in measured.table().columns]
    assert header.index("ΔL W2") < header.index("S W2")  # the estimate beside the measurement

    estimated = diagnose(model, batches, bits=(4, 2), measure=False)
    assert estimated.ranked_by == "estimate"
    scores = [layer["sensitivity"][2] for layer in sorted(estimated.layers, key=lambda layer: layer["rank"])]
    assert scores == sorted(scores, reverse=True)
