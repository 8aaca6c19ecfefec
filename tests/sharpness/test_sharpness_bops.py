"""BOPs: hand-computed counts for plain, strided, depthwise and 1-D convolutions and Linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qready.models import create_model
from qready.quant import prepare_qat
from qready.sharpness import bops, layer_macs


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                      # 3x16x16 -> 8x16x16
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)           # -> 16x8x8
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)           # depthwise -> 16x8x8
        self.grouped = nn.Conv2d(16, 32, 1, groups=4)                  # 4 groups -> 32x8x8
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.dw(self.down(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


HAND = {
    "stem": 3 * 3 * 3 * 8 * 16 * 16,           # k² · C_in · C_out/groups · H · W
    "down": 3 * 3 * 8 * 16 * 8 * 8,
    "dw": 5 * 5 * 16 * (16 // 16) * 8 * 8,
    "grouped": 1 * 1 * 16 * (32 // 4) * 8 * 8,
    "fc": 32 * 10,
}


def test_conv_and_linear_bops_match_hand_counts() -> None:
    report = bops(Net(), (3, 16, 16), w_bits=4, a_bits=8)
    assert [la.name for la in report.layers] == list(HAND)
    for name, macs in HAND.items():
        assert report[name].macs == macs
        assert report[name].bops == macs * 4 * 8
    assert report.total == sum(HAND.values()) * 32


def test_per_layer_bits_and_errors() -> None:
    w = {"stem": 8, "down": 2, "dw": 3, "grouped": 4, "fc": 8}
    report = bops(Net(), (3, 16, 16), w_bits=w, a_bits=dict(w))
    assert report.total == sum(HAND[n] * b * b for n, b in w.items())
    only = bops(Net(), (3, 16, 16), w_bits={"down": 2}, a_bits=4)
    assert [la.name for la in only.layers] == ["down"] and only.total == HAND["down"] * 8
    with pytest.raises(ValueError, match="nope"):
        bops(Net(), (3, 16, 16), w_bits={"nope": 2}, a_bits=4)
    with pytest.raises(ValueError, match="a_bits has no entry"):
        bops(Net(), (3, 16, 16), w_bits=w, a_bits={"stem": 8})
    with pytest.raises(ValueError, match="w_bits"):
        bops(Net(), (3, 16, 16), w_bits=0, a_bits=4)
    with pytest.raises(ValueError, match="input_shape"):
        bops(Net(), (1, 3, -16), w_bits=4, a_bits=4)


def test_conv1d_strided_and_linear_over_tokens() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 5, stride=2, padding=2)   # L 40 -> 20
            self.proj = nn.Linear(20, 7)                          # applied to [1, 6, 20]: 6 tokens
            self.proj2 = nn.Linear(7, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(self.conv(x))
            return self.proj2(self.proj2(h))  # run twice: counted twice

    macs = layer_macs(Seq(), (4, 40))
    assert macs == {"conv": 5 * 4 * 6 * 20, "proj": 20 * 7 * 6, "proj2": 2 * 7 * 7 * 6}


def test_model_zoo_and_qat_models_give_the_same_macs() -> None:
    model = create_model("dwcnn", num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    qat = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, calib=[x])
    assert layer_macs(model, (1, 8, 8)) == layer_macs(qat, (1, 8, 8))
    assert bops(model, (1, 8, 8), 4, 4).total == 16 * bops(model, (1, 8, 8), 1, 1).total
    fresh = prepare_qat(model, method="lsq", w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match="not initialised"):
        layer_macs(fresh, (1, 8, 8))
