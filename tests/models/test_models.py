"""Tests for the model zoo in ``qready.models``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qready.models import MODELS, create_model, list_models

NUM_CLASSES = 7

# name -> (constructor kwargs, input shape for a batch of 2). ImageNet-style models get 64x64 for speed.
SPECS: dict[str, tuple[dict, tuple[int, ...]]] = {
    "mlp": ({}, (2, 1, 8, 8)),
    "dwcnn": ({}, (2, 1, 8, 8)),
    "cnn1d": ({}, (2, 1, 40)),
    "resnet20": ({}, (2, 3, 32, 32)),
    "resnet56": ({}, (2, 3, 32, 32)),
    "resnet18": ({}, (2, 3, 64, 64)),
    "mobilenet_v1": ({}, (2, 3, 64, 64)),
    "mobilenet_v2": ({}, (2, 3, 64, 64)),
    "vgg16": ({}, (2, 3, 32, 32)),
    "alexnet": ({}, (2, 3, 32, 32)),
}

# Extra variants: (name, kwargs, input shape).
VARIANTS = [
    ("resnet18", {"stem": "cifar"}, (2, 3, 32, 32)),
    ("mobilenet_v1", {"stem": "cifar", "width_mult": 0.25}, (2, 3, 32, 32)),
    ("mobilenet_v2", {"stem": "cifar", "width_mult": 0.5}, (2, 3, 32, 32)),
    ("vgg16", {"batch_norm": False}, (2, 3, 32, 32)),
    ("alexnet", {"batch_norm": False}, (2, 3, 32, 32)),
    ("mlp", {"in_features": 40, "hidden": ()}, (2, 40)),
    ("cnn1d", {"width": 16}, (2, 40)),
    ("dwcnn", {"width": 8, "in_channels": 3}, (2, 3, 8, 8)),
]

# Module types that may own parameters (quantizers attach to their ``.weight``).
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_forward_backward(model: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    model.train()
    out = model(x)
    assert out.shape == (shape[0], NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (shape[0], NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_list_models_has_all_names():
    assert set(SPECS) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_every_registered_model_has_a_spec():
    assert set(list_models()) == set(SPECS), "add new models to SPECS"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_backward(name):
    kwargs, shape = SPECS[name]
    torch.manual_seed(0)
    check_forward_backward(create_model(name, num_classes=NUM_CLASSES, **kwargs), shape)


def _variant_id(name: str, kwargs: dict, shape: tuple[int, ...]) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"), [pytest.param(*v, id=_variant_id(*v)) for v in VARIANTS]
)
def test_variants_forward_backward(name, kwargs, shape):
    torch.manual_seed(0)
    check_forward_backward(create_model(name, num_classes=NUM_CLASSES, **kwargs), shape)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_only_weight_modules_own_parameters(name):
    model = create_model(name, **SPECS[name][0])
    for mod_name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, WEIGHT_MODULES), f"{mod_name}: {type(module).__name__} owns parameters"


@pytest.mark.parametrize("name", ["mlp", "dwcnn", "cnn1d", "resnet20", "mobilenet_v2"])
def test_deterministic_given_seed(name):
    torch.manual_seed(123)
    a = create_model(name).state_dict()
    torch.manual_seed(123)
    b = create_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_is_standard():
    model = create_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.all(m.bias == 0)


def test_default_num_classes():
    assert create_model("mlp")(torch.randn(1, 64)).shape == (1, 10)
    assert create_model("resnet20").fc.out_features == 10
    assert create_model("resnet18").fc.out_features == 1000
    assert create_model("mobilenet_v2").classifier[-1].out_features == 1000


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        create_model("resnet9000")
    msg = str(err.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("mobilenet_v2", {"width_mult": 0}, "width_mult"),
        ("mobilenet_v1", {"width_mult": -0.5}, "width_mult"),
        ("mobilenet_v2", {"width_mult": float("nan")}, "width_mult"),
        ("mobilenet_v2", {"stem": "tiny"}, "'imagenet', 'cifar'"),
        ("mobilenet_v1", {"stem": "tiny"}, "stem"),
        ("resnet18", {"stem": "tiny"}, "'imagenet', 'cifar'"),
        ("resnet20", {"num_classes": 0}, "num_classes"),
        ("resnet18", {"in_channels": 0}, "in_channels"),
        ("vgg16", {"num_classes": -1}, "num_classes"),
        ("vgg16", {"batch_norm": "yes"}, "batch_norm"),
        ("alexnet", {"num_classes": 1.5}, "num_classes"),
        ("dwcnn", {"width": 0}, "width"),
        ("cnn1d", {"width": -3}, "width"),
        ("mlp", {"in_features": 0}, "in_features"),
        ("mlp", {"hidden": (64, 0)}, "hidden[1]"),
        ("mlp", {"hidden": 64}, "hidden"),
        ("mlp", {"num_classes": True}, "num_classes"),
    ],
)
def test_bad_args_raise_value_error(name, kwargs, needle):
    with pytest.raises(ValueError) as err:
        create_model(name, **kwargs)
    assert needle in str(err.value)


def test_unexpected_kwarg_raises_type_error():
    with pytest.raises(TypeError):
        create_model("resnet20", widht=3)


def test_mobilenet_width_mult_shrinks():
    assert n_params(create_model("mobilenet_v2", width_mult=0.5)) < n_params(create_model("mobilenet_v2"))
    assert n_params(create_model("mobilenet_v1", width_mult=0.5)) < n_params(create_model("mobilenet_v1"))


def test_mobilenet_v2_channels_divisible_by_8():
    model = create_model("mobilenet_v2", width_mult=0.35)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels != 3:
            assert m.out_channels % 8 == 0


def test_mobilenet_v2_residuals():
    model = create_model("mobilenet_v2")
    flags = [m.use_residual for m in model.modules() if hasattr(m, "use_residual")]
    assert len(flags) == 17 and sum(flags) == 10


def test_param_counts():
    assert 250_000 <= n_params(create_model("resnet20")) <= 300_000
    assert 800_000 <= n_params(create_model("resnet56")) <= 900_000
    assert 11_000_000 <= n_params(create_model("resnet18")) <= 12_500_000
    assert n_params(create_model("dwcnn")) < 20_000


def test_resnet20_uses_option_b_shortcuts():
    model = create_model("resnet20")
    shortcuts = [m.downsample for m in model.modules() if hasattr(m, "downsample")]
    assert len(shortcuts) == 9
    convs = [s for s in shortcuts if s is not None]
    assert len(convs) == 2 and all(isinstance(s[0], nn.Conv2d) and s[0].kernel_size == (1, 1) for s in convs)


@pytest.mark.parametrize(("stem", "size", "expected"), [("imagenet", 64, 2), ("cifar", 32, 4)])
def test_resnet18_stems_downsampling(stem, size, expected):
    model = create_model("resnet18", stem=stem).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, size, size))
    assert feats.shape[-1] == expected


def test_dwcnn_has_depthwise_convs():
    model = create_model("dwcnn")
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(dw) >= 2
    assert any(m.stride == (2, 2) for m in dw)


def test_flat_inputs():
    torch.manual_seed(0)
    mlp = create_model("mlp").eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(mlp(x), mlp(x.flatten(1)))
    cnn = create_model("cnn1d").eval()
    x = torch.randn(3, 40)
    torch.testing.assert_close(cnn(x), cnn(x.unsqueeze(1)))


def test_registry_is_shared():
    assert "resnet20" in MODELS
    with pytest.raises(ValueError):
        MODELS.register("resnet20")(lambda **kw: nn.Identity())


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, bs: int = 64) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_dwcnn_learns_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1350], perm[1350:]
    torch.manual_seed(0)
    model = create_model("dwcnn")
    _fit(model, x[tr], y[tr], epochs=8, lr=1e-2)
    assert _accuracy(model, x[te], y[te]) > 0.9


def test_cnn1d_learns_mnist1d():
    data = pytest.importorskip("mnist1d.data")
    ds = data.make_dataset(data.get_dataset_args())
    x, y = torch.tensor(ds["x"], dtype=torch.float32), torch.tensor(ds["y"])
    xt, yt = torch.tensor(ds["x_test"], dtype=torch.float32), torch.tensor(ds["y_test"])
    torch.manual_seed(0)
    model = create_model("cnn1d")
    _fit(model, x, y, epochs=10, lr=1e-2)
    assert _accuracy(model, xt, yt) > 0.85


class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.0


@pytest.mark.parametrize("name", ["dwcnn", "cnn1d", "resnet20", "mlp"])
def test_weights_accept_parametrizations(name):
    from torch.nn.utils import parametrize

    kwargs, shape = SPECS[name]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        before = model(x)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", _Scale())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
