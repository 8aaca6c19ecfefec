"""Hugging Face models built from a config (no download) through every method and export.

BERT-like: ``BertForSequenceClassification`` (Linear + Embedding), labelled ``(dict, labels)`` batches.
GPT-2-like: ``GPT2LMHeadModel`` (``Conv1D``, weight stored ``[in, out]``; tied embedding/LM head),
unlabeled dict batches and a next-token loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from qready import regularizers  # noqa: E402
from qready.batching import forward, output_tensor  # noqa: E402
from qready.evaluate.inspect import diagnose  # noqa: E402
from qready.evaluate.metrics import evaluate  # noqa: E402
from qready.evaluate.sweep import sweep  # noqa: E402
from qready.export.packed import load_packed, read_packed_meta, save_packed  # noqa: E402
from qready.quant import (  # noqa: E402
    QuantSpec,
    Selector,
    fake_quantize,
    finalize,
    finalize_palettized,
    palettize,
    prepare_qat,
    ptq,
)

VOCAB, TOKENS, BATCH = 64, 10, 8
ACT8 = QuantSpec(bits=8, symmetric=False, granularity="tensor")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


BUILD = {"bert": _bert, "gpt2": _gpt2}


def _batches(name: str, n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
        if name == "bert":
            out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, 0] % 3))
        else:
            out.append({"input_ids": ids})
    return out


def _inputs(batch: object) -> dict:
    return batch[0] if isinstance(batch, tuple) else batch


def _logits(model: nn.Module, batch: object) -> torch.Tensor:
    return output_tensor(forward(model, _inputs(batch)))


def _loss(model: nn.Module, batch: object) -> torch.Tensor:
    logits = _logits(model, batch)
    if isinstance(batch, tuple):
        return nn.functional.cross_entropy(logits, batch[1])
    ids = batch["input_ids"]  # next-token prediction: no labels needed
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def case(request) -> tuple[str, nn.Module, list]:
    return request.param, BUILD[request.param](), _batches(request.param)


def _conv1d(model: nn.Module) -> Conv1D:
    return model.transformer.h[0].attn.c_attn


def test_default_selector_covers_every_weight_layer(case) -> None:
    name, model, _ = case
    kinds = [type(item.module).__name__ for item in Selector().select(model)]
    if name == "gpt2":
        assert kinds.count("Conv1D") == 8 and kinds.count("Embedding") == 2 and kinds.count("Linear") == 1
    else:
        assert kinds.count("Embedding") == 3 and kinds.count("Linear") == 2 * 6 + 2


def test_ptq_weights_and_activations(case) -> None:
    name, model, batches = case
    q = ptq(model, QuantSpec(bits=8), calib=[_inputs(b) for b in batches], act_spec=ACT8)
    with torch.no_grad():
        ref, out = _logits(model, batches[0]), _logits(q, batches[0])
    assert 0 < (out - ref).norm() / ref.norm() < 0.05
    if name == "gpt2":  # Conv1D: one scale per output column, checked against the transposed reference
        w3 = ptq(model, QuantSpec(bits=3))
        w = _conv1d(model).weight.detach()
        assert torch.equal(_conv1d(w3).weight, fake_quantize(w.t(), QuantSpec(bits=3)).t())
        assert max(col.unique().numel() for col in _conv1d(w3).weight.detach().t()) <= 8


LAST_PROJECTION = {"bert": "bert.encoder.layer.1.output.dense", "gpt2": "transformer.h.1.mlp.c_proj"}


def test_gptq_with_bias_correction_toward_the_float_model(case) -> None:
    """With ``bias_correction="model"`` a deep layer's mean output on the calibration batches equals the
    float model's, through dict batches and Conv1D's transposed layout."""
    name, model, batches = case
    calib = [_inputs(b) for b in batches]
    q = ptq(model, QuantSpec(bits=4), calib=calib, method="gptq", bias_correction="model",
            select={"types": (nn.Linear, Conv1D), "exclude": ("lm_head",)})  # GPT-2's head is the tied embedding

    def mean_output(m: nn.Module) -> torch.Tensor:
        outputs = []
        handle = m.get_submodule(LAST_PROJECTION[name]).register_forward_hook(lambda _m, _a, out: outputs.append(out))
        with torch.no_grad():
            for x in calib:
                forward(m, x)
        handle.remove()
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]).mean(0)

    want, got = mean_output(model), mean_output(q)
    assert not torch.equal(q.get_submodule(LAST_PROJECTION[name]).weight, model.get_submodule(LAST_PROJECTION[name]).weight)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()) + 1e-6)


@pytest.mark.parametrize("method", ["ste", "lsq", "ewgs"])
def test_qat(case, method: str) -> None:
    name, model, batches = case
    q = prepare_qat(model, method=method, w_bits=4, a_bits=8, w_granularity="channel",
                    calib=[_inputs(b) for b in batches])
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    q.train()
    for batch in batches:
        opt.zero_grad()
        loss = _loss(q, batch)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    q.eval()
    with torch.no_grad():
        before = _logits(q, batches[0])
        finalize(q)
        assert torch.allclose(_logits(q, batches[0]), before, atol=1e-5)
    if name == "gpt2":
        cols = _conv1d(q).weight.detach().t()
        assert max(c.unique().numel() for c in cols) <= 16 < _conv1d(q).weight.unique().numel()


@pytest.mark.parametrize("reg_name", ["linf", "margin", "soft_min_max", "grad_l1", "cluster"])
def test_regularizers(case, reg_name: str) -> None:
    name, _, batches = case
    model = BUILD[name]()
    reg = regularizers.build(reg_name, model, weight=0.1)
    loss = _loss(model, batches[0])
    term = reg(model, loss=loss)
    assert torch.isfinite(term) and term > 0
    params = [p for n, p in model.named_parameters() if n.endswith("weight")] + list(reg.parameters())
    grads = torch.autograd.grad(term, params, allow_unused=True)
    reached = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached >= len(reg.layer_names) // 2  # the penalty reaches the selected layers (or their margins)


@pytest.mark.parametrize("method", ["kmeans", "dkm"])
def test_palettize(case, method: str) -> None:
    name, model, batches = case
    pal = palettize(model, bits=2, method=method, granularity="group", group_size=16)
    if method == "dkm":
        opt = torch.optim.SGD(pal.parameters(), lr=1e-3)
        pal.train()
        for batch in batches[:2]:
            opt.zero_grad()
            _loss(pal, batch).backward()
            opt.step()
        finalize_palettized(pal.eval())
    layer = _conv1d(pal) if name == "gpt2" else pal.bert.encoder.layer[0].attention.self.query
    w = layer.weight.detach()
    groups = w.split(16, dim=1) if name == "gpt2" else w.split(16, dim=0)  # output channels
    assert all(g.unique().numel() <= 4 for g in groups)
    assert torch.isfinite(_logits(pal, batches[0])).all()


def test_packed_export_roundtrip(case, tmp_path) -> None:
    name, model, batches = case
    q = ptq(model, QuantSpec(bits=4))
    info = save_packed(q, tmp_path / "m.qready")
    assert "float" not in set(info["layers"].values())
    back = load_packed(tmp_path / "m.qready", model_factory=BUILD[name])
    with torch.no_grad():
        assert torch.equal(_logits(back, batches[0]), _logits(q, batches[0]))
    if name == "gpt2":
        layers = read_packed_meta(tmp_path / "m.qready")["layers"]
        assert layers["transformer.h.0.attn.c_attn.weight"]["axis"] == 1


@pytest.mark.parametrize("act", [None, ACT8], ids=["W8", "W8A8"])
def test_onnx_export(case, tmp_path, act: QuantSpec | None) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from qready.export.onnx import export_onnx, weight_encodings

    name, model, batches = case
    q = ptq(model, QuantSpec(bits=8), calib=[_inputs(b) for b in batches], act_spec=act).eval()
    path = export_onnx(q, _inputs(batches[0]), tmp_path / "m.onnx")
    assert set(weight_encodings(path).values()) == {"int8 (W8)"}
    # basic graph optimizations: the extended ones fuse DequantizeLinear -> Gemm/MatMul into an integer
    # kernel that also quantizes the activations on the fly (~1e-3 relative error of its own)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = _inputs(batches[1])  # another batch: the batch dimension is dynamic
    (out,) = session.run(None, {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        ref, fp = _logits(q, batches[1]).numpy(), _logits(model, batches[1]).numpy()
    assert out.shape == ref.shape
    err, quant_err = np.abs(out - ref).max(), np.abs(fp - ref).max()
    if act is None:  # float rounding of two runtimes only
        assert err <= 1e-5 * np.abs(ref).max()
    else:  # an activation within an ulp of a rounding boundary can land one grid step apart
        exact_rows = (np.abs(out - ref).max(axis=-1) <= 1e-4 * np.abs(ref).max()).mean()
        assert exact_rows >= 0.25 and err <= 2 * quant_err


def test_consumers_read_hf_dict_batches() -> None:
    bert, batches = _bert(), _batches("bert")
    metrics = evaluate(bert, batches)
    assert metrics["n"] == 3 * BATCH
    rows = sweep(bert, batches, bits=["W8", "W8A8"], calib=[b[0] for b in batches])
    assert [r["label"] for r in rows] == ["FP", "W8", "W8A8"]
    diag = diagnose(bert, batches, bits=(8, 4), num_batches=1, measure=False)
    assert len(diag.layers) == 17 and diag.num_samples == BATCH
    with pytest.raises(TypeError, match="evaluate needs labelled batches"):
        evaluate(_gpt2(), _batches("gpt2"))


@pytest.mark.parametrize("search", ["sensitivity", "reinforce"])
def test_mixed_precision_search_on_dict_batches(search: str) -> None:
    from qready.sharpness import bops, layer_macs, ptq_mixed, search_mixed_precision

    bert, batches = _bert(), _batches("bert")
    example = batches[0]
    macs = layer_macs(bert, example)
    # a Linear's MACs per sample: in x out per token (the pooler and classifier see one vector per sample)
    query = bert.bert.encoder.layer[0].attention.self.query
    assert macs["bert.encoder.layer.0.attention.self.query"] == TOKENS * query.in_features * query.out_features
    assert macs["classifier"] == bert.classifier.in_features * bert.classifier.out_features
    assert layer_macs(bert, example[0]) == macs  # the dict alone, or the (dict, labels) pair
    select = Selector(types=(nn.Linear,))
    names = [item.name for item in select.select(bert)]
    target = bops(bert, example, dict.fromkeys(names, 4), 32).total
    extra = {"steps": 3, "samples": 4, "seed": 0} if search == "reinforce" else {}
    result = search_mixed_precision(bert, batches, example, target, search=search, bits=(2, 4, 8), a_bits=None,
                                    select=select, loss="kl", rho=0.0, batches=1, **extra)
    assert set(result.config) == set(names) and result.bops <= target
    assert _logits(ptq_mixed(bert, result.config, QuantSpec(bits=8, granularity="channel")), batches[0]).isfinite().all()
    with pytest.raises(ValueError, match="example batch"):
        layer_macs(bert, "not a batch")
