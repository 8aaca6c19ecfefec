"""One dispatch mechanism: QAT methods, palettizers, compress stages (and PTQ methods, sharpness kinds)
are found by name in registries, and the recipe's allowed values are those names."""

import pytest
import torch
from torch import nn

from qready.app import compress
from qready.quant.palettize import PALETTIZERS
from qready.quant.qat import QAT_METHODS, prepare_qat
from qready.quant.qat.methods import STE
from qready.recipe import CompressConfig, RecipeError, recipe_from_dict
from qready.regularizers import DEFAULT_WEIGHT
from qready.train import TrainConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_unknown_qat_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown QAT method 'dorefa'; valid names: ewgs, lsq, ste"):
        prepare_qat(_net(), method="dorefa")


def test_a_new_qat_method_is_one_registered_class(monkeypatch):
    monkeypatch.setitem(QAT_METHODS._items, "ste_tensor", type("STETensor", (STE,), {"default_granularity": "tensor"}))
    qmodel = prepare_qat(_net(), method="ste_tensor", w_bits=4)
    quantizer = qmodel[0].parametrizations["weight"][0]
    assert quantizer.granularity == "tensor"
    # the recipe accepts the new name without any change to the recipe module
    assert CompressConfig(method="ste_tensor").method == "ste_tensor"


def test_recipe_methods_are_the_registry_names():
    with pytest.raises(RecipeError) as err:
        CompressConfig(method="nope")
    for name in (*QAT_METHODS.names(), *PALETTIZERS.names()):
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(("method", "options", "match"), [
    ("lsq", {"tau": 0.1}, r"compress.options.tau is not an option of method 'lsq'"),
    ("dkm", {"delta": 0.1}, r"compress.options.delta is not an option of method 'dkm'; allowed: tau"),
    ("kmeans", {"tau": 0.1}, r"allowed: kmeans_method"),
    ("cluster", {"bogus": 1}, r"compress.options.bogus is not an option of method 'cluster'"),
])
def test_compress_options_are_checked_per_method(method, options, match):
    with pytest.raises(RecipeError, match=match):
        CompressConfig(method=method, w_bits=2, options=options)


def test_compress_bits_come_from_the_palettizer():
    with pytest.raises(RecipeError, match=r"compress.w_bits must be one of \[1, 2, 3, 4\] for method 'dkm'"):
        CompressConfig(method="dkm", w_bits=6)
    assert CompressConfig(method="kmeans", w_bits=6, epochs=0).epochs == 0
    with pytest.raises(RecipeError, match="compress.epochs must be >= 1 for method 'dkm'"):
        CompressConfig(method="dkm", w_bits=2, epochs=0)


def test_regularizer_options_are_checked():
    with pytest.raises(RecipeError, match=r"regularizers\[0\].options.alpha is not an option of 'linf'"):
        recipe_from_dict({"regularizers": [{"name": "linf", "options": {"alpha": 1.0}}]})


def test_cluster_compression_uses_the_library_default_weight(monkeypatch):
    seen = {}

    def fake_fit(model, loader, cfg, *, loss_terms=(), **kwargs):
        seen["weight"] = loss_terms[0].weight

    monkeypatch.setattr(compress, "fit", fake_fit)
    config = CompressConfig(method="cluster", w_bits=2, epochs=1)
    compress.compress_model(_net(), config, [torch.randn(4, 8)], TrainConfig(epochs=1), {})
    assert seen["weight"] == DEFAULT_WEIGHT == 0.01


@pytest.mark.parametrize("method", ["kmeans", "dkm", "cluster", "lsq"])
def test_every_compress_method_has_a_handler(method):
    assert compress.COMPRESS_STAGES.get(compress.compress_kind(method))


@pytest.mark.parametrize(("block", "match"), [
    ({"kind": "sgd"}, r"sharpness.kind must be one of \['asam', 'sam', 'saq'\]"),
    ({"kind": "sam", "act_clip": True}, "sharpness.act_clip is not an option of kind 'sam'"),
    ({"kind": "saq", "radius": 0.3}, "unknown recipe key 'sharpness.radius'"),
    ({"kind": "saq", "rho": "big"}, "recipe key 'sharpness.rho': expected"),
])
def test_sharpness_block_is_typed(block, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict({"sharpness": block})


def test_sharpness_kinds_come_from_the_registry():
    from qready.sharpness import SHARPNESS_KINDS, SAMStep, SharpnessConfig, build_step

    assert SHARPNESS_KINDS.names() == ["asam", "sam", "saq"]
    recipe = recipe_from_dict({"sharpness": {"kind": "asam", "rho": 0.4}})
    assert isinstance(recipe.sharpness, SharpnessConfig)
    step = build_step(recipe.sharpness)
    assert isinstance(step, SAMStep) and step.adaptive and step.rho == 0.4
