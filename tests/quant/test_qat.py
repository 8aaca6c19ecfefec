"""prepare_qat / finalize / qat_param_groups / EWGS delta estimation, on toy nets, the zoo and digits."""

import copy
import io

import pytest
import torch
from safetensors.torch import load, save
from torch import nn
from torch.nn.utils import parametrize

from qready.models import create_model, list_models
from qready.quant import ActivationQuantizer, Selector
from qready.quant.qat import finalize, prepare_qat, qat_param_groups, quantizer_parameters
from qready.quant.qat.hessian import EWGSDeltaUpdater, estimate_ewgs_deltas, ewgs_quantizers
from qready.quant.qat.quantizers import EWGSActivationQuantizer, QATQuantizer

METHODS = ("ste", "lsq", "ewgs")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def _batches(n=3, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _train_steps(model: nn.Module, steps: int = 3) -> None:
    quantizer = {id(p) for p in quantizer_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in quantizer]
    opt = torch.optim.SGD([{"params": rest}, *qat_param_groups(model, lr=1e-3)], lr=0.05)
    model.train()
    for x, y in _batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("method", METHODS)
def test_prepare_returns_copy_and_finalize_matches_qat_model(method):
    model = _net()
    before = _snapshot(model)
    q = prepare_qat(model, method=method, w_bits=2, a_bits=4, calib=_batches())
    assert q is not model and _same_state(model, before)
    assert not parametrize.is_parametrized(model[0])
    _train_steps(q)
    x = _batches(1, 32)[0][0]
    q.eval()
    with torch.no_grad():
        expected = q(x)
    finalize(q)
    assert not any(parametrize.is_parametrized(m) for m in q.modules())
    assert not any(isinstance(m, QATQuantizer) and any(p.requires_grad for p in m.parameters()) for m in q.modules())
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    for idx in (0, 3, 7):
        w = q[idx].weight.detach()
        assert all(row.unique().numel() <= 4 for row in w.reshape(w.shape[0], -1))
    if method in ("ste", "lsq"):
        assert isinstance(q[0].input_quantizer, ActivationQuantizer)
    else:
        assert isinstance(q[0].input_quantizer, EWGSActivationQuantizer)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("method", METHODS)
def test_weight_bits_one_to_eight(method, bits):
    model = _net()
    q = prepare_qat(model, method=method, w_bits=bits)
    _train_steps(q, steps=1)
    q.eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        expected = q(x)
        finalize(q)
        assert torch.equal(q(x), expected)
    for idx in (0, 3, 7):
        w = q[idx].weight.detach()
        counts = [row.unique().numel() for row in w.reshape(w.shape[0], -1)]
        assert max(counts) <= 2**bits
        assert max(counts) > 1


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_and_state_dict_round_trip(method):
    q = prepare_qat(_net(), method=method, w_bits=3, a_bits=4, calib=_batches())
    _train_steps(q)
    q.eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(copy.deepcopy(q)(x), expected)
    state = load(save({k: v.contiguous() for k, v in q.state_dict().items()}))  # safetensors-compatible
    fresh = prepare_qat(_net(), method=method, w_bits=3, a_bits=4)  # not calibrated
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True).keys() == q.state_dict().keys()


@pytest.mark.parametrize("method", METHODS)
def test_param_groups_hold_exactly_the_quantizer_parameters(method):
    q = prepare_qat(_net(), method=method, w_bits=2, a_bits=4, calib=_batches())
    groups = qat_param_groups(q, lr=0.01, weight_decay=0.0)
    expected = {id(p) for name, p in q.named_parameters() if ".parametrizations.weight.0." in name
                or ".input_quantizer." in name}
    got = [p for g in groups for p in g["params"]]
    assert {id(p) for p in got} == expected and len(got) == len(expected)
    assert {id(p) for p in quantizer_parameters(q)} == expected
    if method == "ste":
        assert groups == []
    else:
        assert groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 0.0 and len(got) > 0
        names = {name.rsplit(".", 1)[-1] for name, p in q.named_parameters() if id(p) in expected}
        assert names == ({"step"} if method == "lsq" else {"lower", "upper"})


def test_first_last_policies():
    model = _net()
    q = prepare_qat(model, method="lsq", w_bits=2, first_last="float")
    assert not parametrize.is_parametrized(q[0]) and not parametrize.is_parametrized(q[7])
    assert parametrize.is_parametrized(q[3])
    q8 = prepare_qat(model, method="lsq", w_bits=2, a_bits=4, first_last=8, calib=_batches())
    assert q8[0].parametrizations.weight[0].bits == 8 and q8[3].parametrizations.weight[0].bits == 2
    assert q8[0].input_quantizer.bits == 8 and q8[3].input_quantizer.bits == 4
    sel = prepare_qat(model, method="lsq", w_bits=2, select=Selector(first_last="float"))
    assert not parametrize.is_parametrized(sel[0])


def test_inplace_and_lazy_initialisation():
    model = _net()
    q = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, inplace=True)
    assert q is model and parametrize.is_parametrized(model[0])
    with pytest.raises(ValueError, match="never initialised"):
        finalize(copy.deepcopy(q))
    q(_batches(1)[0][0])  # first batch initialises the activation steps
    assert model[3].input_quantizer.initialized and model[3].input_quantizer.step.item() > 0
    finalize(q)


def test_embedding_weights_are_quantized_and_inputs_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 3))
    q = prepare_qat(model, method="lsq", w_bits=2, a_bits=4)
    assert parametrize.is_parametrized(q[0]) and not hasattr(q[0], "input_quantizer")
    tokens = torch.randint(0, 20, (4, 5))
    q(tokens).sum().backward()
    finalize(q)
    assert all(row.unique().numel() <= 4 for row in q[0].weight.detach())


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"w_bits": 0}, "w_bits"),
        ({"w_bits": 9}, "w_bits"),
        ({"w_bits": 4, "a_bits": 1}, "a_bits"),
        ({"w_bits": 4, "a_bits": 17}, "a_bits"),
        ({"w_bits": None, "a_bits": None}, "nothing to quantize"),
        ({"method": "pact"}, "method"),
        ({"first_last": 16}, "first_last"),
        ({"w_granularity": "group"}, "w_granularity"),
        ({"select": Selector(types=(nn.BatchNorm2d,))}, r"'1' \(BatchNorm2d\).*>= 2 dims"),
        ({"select": Selector(types=(nn.LSTM,))}, "no module.*LSTM"),
        ({"select": {"include": ("nothing",)}}, "no module"),
    ],
)
def test_bad_inputs_raise_and_leave_model_unchanged(kwargs, match, inplace):
    model = _net()
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_qat(model, inplace=inplace, **kwargs)
    assert _same_state(model, before)
    assert not any(parametrize.is_parametrized(m) or hasattr(m, "input_quantizer") for m in model.modules())


def test_custom_module_without_matrix_weight_is_named():
    model = nn.Sequential(nn.Linear(4, 4), _Scale())
    with pytest.raises(ValueError, match=r"module '1' \(_Scale\)"):
        prepare_qat(model, select={"types": (nn.Linear, _Scale)}, inplace=True)
    assert not parametrize.is_parametrized(model[0])
    with pytest.raises(ValueError, match="no module"):
        prepare_qat(nn.Sequential(nn.ReLU()))


def test_failed_calibration_undoes_inplace_changes():
    model = _net()
    before = _snapshot(model)
    weight = model[0].weight
    with pytest.raises(ValueError, match="calib yielded no batches"):
        prepare_qat(model, method="lsq", w_bits=2, a_bits=4, calib=[], inplace=True)
    assert _same_state(model, before) and model[0].weight is weight
    assert not any(parametrize.is_parametrized(m) or hasattr(m, "input_quantizer") for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    prepare_qat(model, method="lsq", w_bits=2, a_bits=4, calib=_batches(), inplace=True)  # still preparable


def test_prepare_twice_and_finalize_plain_model_raise():
    q = prepare_qat(_net(), method="lsq", w_bits=4)
    with pytest.raises(ValueError, match="already has a QAT weight quantizer"):
        prepare_qat(q, method="lsq", w_bits=2)
    with pytest.raises(ValueError, match="no QAT quantizers"):
        finalize(_net())


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model(name):
    shapes = {"mlp": (2, 64), "dwcnn": (2, 1, 8, 8), "cnn1d": (2, 1, 40)}
    kwargs = {} if name == "mlp" else {"in_channels": shapes.get(name, (2, 3))[1]}
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs)
    x = torch.randn(*shapes.get(name, (2, 3, 32, 32)))
    q = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, calib=[x])
    q.train()
    q(x).sum().backward()
    assert all(p.grad is not None for p in quantizer_parameters(q))
    q.eval()
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(finalize(q)(x), expected)


def test_ewgs_delta_matches_exact_hessian_formula():
    # outputs = W (identity inputs) and loss = sum(exp(W)): the Hessian in x_q is diagonal, so
    # Hutchinson is exact with one probe and delta = (Tr(H) / N) / (3 std(g)) can be checked exactly
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    q = prepare_qat(model, method="ewgs", w_bits=2)
    wq = q.parametrizations.weight[0]
    deltas = estimate_ewgs_deltas(q, [(torch.eye(3), torch.zeros(3))], loss_fn=lambda out, _: out.exp().sum(),
                                  samples=1)
    assert list(deltas) == ["parametrizations.weight.0"]

    def loss_of(x_q):
        return (wq.lower + x_q * (wq.upper - wq.lower)).exp().sum()

    with torch.no_grad():
        x_n = ((q.parametrizations.weight.original - wq.lower) / (wq.upper - wq.lower)).clamp(0, 1)
        x_q = (torch.round(x_n * 3) / 3).requires_grad_(True)
    grad = torch.autograd.grad(loss_of(x_q), x_q)[0]
    trace = torch.diagonal(torch.autograd.functional.hessian(loss_of, x_q.detach()).reshape(6, 6)).sum()
    expected = (trace / 6 / (3 * grad.std())).item()
    assert expected > 0
    assert deltas["parametrizations.weight.0"] == pytest.approx(expected, rel=1e-5)
    assert wq.delta.item() == pytest.approx(expected, rel=1e-5)


def _digits():
    from qready.data import load_dataset, make_loaders

    splits = load_dataset("digits", seed=0)
    return make_loaders(splits, 64, seed=0)


def test_short_lsq_w4a4_qat_on_digits_stays_close_to_float():
    from qready.evaluate import evaluate
    from qready.train import TrainConfig, fit

    train, test = _digits()
    torch.manual_seed(0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=16)
    fit(model, train, TrainConfig(epochs=4, lr=0.01), seed=0, progress=False)
    fp = evaluate(model, test)["accuracy"]
    q = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, calib=train)
    fit(q, train, TrainConfig(epochs=2, lr=1e-3), seed=0, progress=False,
        param_groups=qat_param_groups(q, lr=1e-3))
    qat = evaluate(finalize(q), test)["accuracy"]
    assert fp > 85
    assert qat >= fp - 5


def test_ewgs_inside_fit_with_delta_updater():
    from qready.train import TrainConfig, fit

    train, _ = _digits()
    torch.manual_seed(0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=8)
    q = prepare_qat(model, method="ewgs", w_bits=2, a_bits=4, calib=train)
    bn_before = q.features[0][1].running_mean.clone()
    updater = EWGSDeltaUpdater(train, max_batches=1, samples=2)
    result = fit(q, train, TrainConfig(epochs=1, lr=1e-3), seed=0, progress=False, callbacks=[updater],
                 param_groups=qat_param_groups(q, lr=1e-3))
    assert "ewgs_delta_mean" in result.final and result.final["ewgs_delta_mean"] >= 0
    deltas = [float(m.delta) for _, m in ewgs_quantizers(q)]
    assert any(d != 1e-3 for d in deltas) and all(d >= 0 for d in deltas)
    assert not torch.equal(q.features[0][1].running_mean, bn_before)  # fit trained; the probe restored its own
    assert all(m.captured is None and not m.capture for _, m in ewgs_quantizers(q))


def test_finalize_of_a_deep_copy_leaves_the_original_working():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    qmodel = prepare_qat(net, method="lsq", w_bits=4)
    x = torch.randn(3, 8)
    before = qmodel(x)
    baked = finalize(copy.deepcopy(qmodel))
    assert torch.allclose(baked.eval()(x), qmodel.eval()(x), atol=1e-6)
    assert torch.equal(qmodel.train()(x), before)
    finalize(qmodel)  # the original can still be finalized itself
