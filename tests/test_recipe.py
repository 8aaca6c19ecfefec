"""Recipes: YAML <-> dataclasses, validation messages that name the key and the allowed values."""

import pytest

from qready.recipe import Recipe, RecipeError, apply_overrides, load_recipe, save_recipe


def test_defaults_and_roundtrip(tmp_path):
    recipe = load_recipe({"name": "x", "train": {"epochs": 2, "lr": 0.01}, "sweep": {"bits": [8, "W4A8"]}})
    assert isinstance(recipe, Recipe)
    assert recipe.train.epochs == 2 and recipe.train.lr == 0.01
    assert recipe.sweep.bits == (8, "W4A8")
    path = tmp_path / "r.yaml"
    save_recipe(recipe, path)
    assert load_recipe(path) == recipe


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"trian": {}}, ["'trian'", "train", "sweep"]),
        ({"train": {"lrr": 0.1}}, ["'train.lrr'", "lr", "epochs"]),
        ({"train": {"lr": "fast"}}, ["train.lr", "number"]),
        ({"train": {"optimizer": "rmsprop"}}, ["optimizer", "'sgd'", "'adam'"]),
        ({"sweep": {"bits": [8, 0]}}, ["sweep.bits[1]", "1, 2, 3"]),
        ({"sweep": {"bits": ["four"]}}, ["sweep.bits[0]", "four"]),
        ({"sweep": {"ranges": ["kl"]}}, ["sweep.ranges", "minmax", "mse"]),
        ({"sweep": {"granularity": "row"}}, ["sweep.granularity", "channel"]),
        ({"model": {"name": "resnet9000"}}, ["model.name", "resnet20", "dwcnn"]),
        ({"data": {"name": "imagenet21k"}}, ["data.name", "digits", "mnist1d"]),
        ({"regularizers": [{"name": "nope"}]}, ["regularizers[0].name", "nope"]),
        ({"seed": 1.5}, ["'seed'", "integer"]),
        ({"compress": {"method": "lsq", "w_bits": 0}}, ["compress.w_bits", "1, 2"]),
        ({"compress": {"method": "kmeans", "a_bits": 4}}, ["compress.a_bits", "kmeans"]),
        ({"compress": {"method": "dkm", "sharpness": {"kind": "saq"}}}, ["compress.sharpness", "lsq"]),
        ({"compress": {"method": "lsq", "sharpness": {"kind": "sam", "rh0": 1}}}, ["compress.sharpness", "rh0"]),
        ({"export": {"format": "tflite"}}, ["export.format", "packed", "onnx"]),
        ([1, 2], ["mapping"]),
    ],
)
def test_errors_name_the_key(data, needles):
    with pytest.raises(RecipeError) as err:
        _load_any(data)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def _load_any(data):
    from qready.recipe import recipe_from_dict

    return recipe_from_dict(data)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_overrides():
    data = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.5", "seed=3", "sweep.bits=[8, 4]"])
    recipe = load_recipe(data)
    assert recipe.train.lr == 0.5 and recipe.seed == 3 and recipe.sweep.bits == (8, 4)
    with pytest.raises(RecipeError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
