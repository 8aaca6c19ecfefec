"""palettize / finalize_palettized: distinct-value counts, methods, training through fit, errors."""

import pytest
import torch
from torch import nn

from qready.data import load_dataset, make_loaders
from qready.evaluate import evaluate
from qready.models import create_model
from qready.quant import Selector, finalize_palettized, palettize
from qready.quant.palettize.codebook import find_palette
from qready.regularizers import build
from qready.train import TrainConfig, fit

LAYERS = (nn.Conv2d, nn.Linear)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("dwcnn", num_classes=10, in_channels=1, width=8)


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kmeans_leaves_at_most_2_to_the_b_values(bits: int) -> None:
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pal = palettize(model, bits, "kmeans")
    for name, m in layers(pal):
        assert m.weight.unique().numel() <= 2**bits, name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_dkm_then_finalize_leaves_at_most_2_to_the_b_values_per_lut(bits: int, granularity: str) -> None:
    group_size = {"tensor": None, "channel": 1, "group": 4}[granularity]
    pal = palettize(small_model(), bits, "dkm", granularity=granularity,
                    group_size=group_size if granularity == "group" else None)
    pal.train()
    loss = pal(torch.randn(8, 1, 8, 8)).square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in pal.named_parameters() if n.endswith("original"))
    finalize_palettized(pal)
    assert not any(hasattr(m, "parametrizations") for _, m in layers(pal))
    for name, m in layers(pal):
        for rows in m.weight.detach().split(group_size or m.weight.shape[0]):
            assert rows.unique().numel() <= 2**bits, name
        palette = find_palette(m.weight, bits=bits)
        assert palette is not None and palette.group_size in ((None,) if group_size is None else (None, 4, 2, 1))


def test_eval_mode_shows_the_snapped_model_finalize_bakes_in() -> None:
    pal = palettize(small_model(), 2, "dkm").eval()
    x = torch.randn(4, 1, 8, 8)
    before = pal(x)
    finalize_palettized(pal)
    torch.testing.assert_close(pal(x), before, rtol=0, atol=0)


def test_first_last_bits_override() -> None:
    pal = palettize(small_model(), 1, "kmeans", select=Selector(first_last=3))
    named = layers(pal)
    assert named[0][1].weight.unique().numel() > 2
    assert named[0][1].weight.unique().numel() <= 8
    assert named[1][1].weight.unique().numel() <= 2


def test_cluster_snaps_onto_the_regularizer_representatives() -> None:
    model = small_model()
    reg = build("cluster", model, weight=1.0, bits=2)
    with torch.no_grad():
        for rep in reg.reps.values():
            rep.add_(0.01)  # as if trained
    pal = palettize(model, 2, "cluster", reg=reg)
    for name, m in layers(pal):
        assert set(m.weight.unique().tolist()) <= set(reg.representatives(name).tolist()), name


def test_dkm_fine_tuning_through_fit_keeps_accuracy() -> None:
    splits = load_dataset("digits", seed=0)
    train_loader, test_loader = make_loaders(splits, 64, seed=0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=16)
    fit(model, train_loader, TrainConfig(epochs=6, lr=0.01, optimizer="adam", schedule="cosine"), seed=0,
        progress=False)
    fp = evaluate(model, test_loader)["accuracy"]
    pal = palettize(model, 4, "dkm")
    fit(pal, train_loader, TrainConfig(epochs=2, lr=0.002, optimizer="adam", schedule="cosine"), seed=0,
        progress=False)
    finalize_palettized(pal)
    acc = evaluate(pal, test_loader)["accuracy"]
    assert fp > 85
    assert acc > fp - 5
    for _, m in layers(pal):
        assert m.weight.unique().numel() <= 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0, "method": "dkm"}, r"bits \(method='dkm'\) must be one of \[1, 2, 3, 4\]"),
        ({"bits": 5, "method": "dkm"}, r"bits \(method='dkm'\) must be one of \[1, 2, 3, 4\]"),
        ({"bits": 9, "method": "kmeans"}, r"must be one of \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ({"bits": 0, "method": "kmeans"}, r"must be one of \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ({"bits": 2, "method": "lloyd"}, "unknown palettization method 'lloyd'; valid names: cluster, dkm, gptq, kmeans"),
        ({"bits": 2, "method": "kmeans", "granularity": "row"}, "granularity must be one of"),
        ({"bits": 2, "method": "kmeans", "granularity": "group"}, r"group_size \(with granularity='group'\) must be an integer"),
        ({"bits": 2, "method": "kmeans", "group_size": 4}, "only used with granularity='group'"),
        ({"bits": 2, "method": "cluster"}, "needs reg="),
        ({"bits": 2, "method": "kmeans", "select": {"include": ("nothing",)}}, "nothing to palettize"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        palettize(small_model(), **kwargs)


def test_an_option_of_another_method_is_refused() -> None:
    with pytest.raises(TypeError, match="method='kmeans' has no option 'tau'; its options: kmeans_method"):
        palettize(small_model(), 2, "kmeans", tau=0.1)


def test_dkm_override_above_four_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="first_last bits of 'features.0.0'"):
        palettize(small_model(), 2, "dkm", select=Selector(first_last=8))


def test_cluster_bits_must_match_the_regularizer() -> None:
    model = small_model()
    reg = build("cluster", model, bits=3)
    with pytest.raises(ValueError, match="bits=2 but the cluster regularizer has bits=3"):
        palettize(model, 2, "cluster", reg=reg)


def test_palettizing_twice_and_finalizing_nothing_are_errors() -> None:
    pal = palettize(small_model(), 2, "dkm")
    with pytest.raises(ValueError, match="already has a parametrization"):
        palettize(pal, 2, "dkm", inplace=True)
    with pytest.raises(ValueError, match="no DKM parametrization"):
        finalize_palettized(small_model())


def test_finalize_palettized_of_a_deep_copy_leaves_the_original_working() -> None:
    import copy

    model = palettize(small_model(), 2, "dkm").eval()
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    finalize_palettized(copy.deepcopy(model))
    assert torch.equal(model(x), before)
