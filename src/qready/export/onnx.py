"""ONNX export of a quantized model in QDQ form (QuantizeLinear/DequantizeLinear), checked in onnxruntime.

:func:`export_onnx` takes a model whose weights already lie on their quantization grid (from
:func:`qready.ptq`, a finalized QAT model or a palettized one) and writes an ONNX file that computes
what the PyTorch model computes:

* **Weights** of the selected layers (every weight-bearing layer type of :mod:`qready.quant.layers` by
  default) are stored as integer codes with a ``DequantizeLinear`` node: per-channel (along each layer's
  output-channel axis, e.g. 1 for Hugging Face ``Conv1D``) or per-tensor scales and zero points from
  :func:`qready.quant.quantize` with ``spec`` (default: symmetric per-channel min-max at ``w_bits``).
  Codes are INT8/UINT8, or packed INT4/UINT4 when the grid has at most 4 bits and ``opset >= 21``.
  1-bit weights (``±scale``) are stored as codes ``±1`` with zero point 0. A weight on another
  symmetric per-channel grid (a learned LSQ step) is found with :func:`qready.export.packed.signed_grid`
  and stored the same way, with its own steps.
  A weight that is not on that grid but has at most 256 distinct values per output channel
  (palettized, LSQ-finalized, or quantized with another spec) is stored exactly as uint8 indices and
  a float look-up table (``Cast -> [Add group offset] -> Gather``) when that is smaller than the
  float weight. Any other weight stays float (logged as a warning).
  The encoding of every selected weight is recorded in the model's metadata (``qready.weights``).
* **Activations** quantized by an :class:`~qready.quant.activations.ActivationQuantizer` (PTQ, or a
  finalized LSQ/STE QAT model) become ``QuantizeLinear -> [Clip] -> DequantizeLinear`` with the
  calibrated scale and zero point: an INT8/UINT8 code container (INT16 for 16-bit, opset >= 21), and
  an integer ``Clip`` to ``[qmin, qmax]`` when the grid is narrower than the container.
  A finalized EWGS input quantizer (learned bounds ``l < u``, whose grid need not hold 0, so it has
  no integer zero point) becomes the float graph ``l + Round(Clip((x - l) / (u - l), 0, 1)·L) / L·(u - l)``
  with ``L = 2^b - 1``. 1-bit (sign) activations have no Q/DQ form and are refused.
* ``weights_only=True``: Linear weights of 2, 4 or 8 bits become ONNX Runtime's block-quantized
  ``MatMulNBits`` and other weights int8/uint8 Q/DQ (see :mod:`qready.export.onnx_weights`); no
  activation quantizers.

The graph comes from PyTorch's TorchScript-based exporter (``dynamo=False``: it works offline, without
``onnxscript``) at opset ``min(opset, 20)`` in ``TrainingMode.PRESERVE`` (so BatchNorm is not folded
into the quantized convolution weights), converted with ``onnx.version_converter`` when ``opset`` is
higher, and then rewritten with the ``onnx`` API.

Parity: ONNX ``QuantizeLinear`` divides by the scale while qready multiplies by its reciprocal, and the
float convolutions of two runtimes differ in the last bits; an activation within an ulp of a rounding
boundary can therefore land one grid step apart. Weight-only models agree to float rounding.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batching import Inputs, forward, move_inputs, output_tensor
from ..quant.activations import ATTR, ActivationQuantizer
from ..quant.grid import fake_quantize_rows
from ..quant.qat.quantizers import EWGSActivationQuantizer
from ..quant.ranges import MIN_SCALE
from ..quant.select import Selector, as_selector
from ..quant.spec import WEIGHT_BITS, QuantSpec, check_bits
from .onnx_qdq import (
    code_container,
    encode_weights,
    find_initializer,
    rewrite_weight,
)

log = logging.getLogger("qready.export")

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis DequantizeLinear
TORCH_EXPORTER_MAX_OPSET = 20  # the TorchScript-based exporter of torch 2.x
METADATA_KEY = "qready.weights"
NAMES_KEY = "qready.weight_initializers"  # {weight key: name of its initializer / decoded tensor}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'qready[export]'") from e
    return onnx


# -------------------------------------------------------------------------------- activations


class _QDQ(torch.autograd.Function):
    """Per-tensor fake quantization ``[qmin, qmax]`` of ``x``; exported as QuantizeLinear -> [Clip] ->
    DequantizeLinear with the code container ``container`` (an ONNX type name)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,  # type: ignore[override]
                container: str) -> torch.Tensor:
        s = torch.tensor([[scale]], dtype=x.dtype, device=x.device)
        z = torch.tensor([[float(zero_point)]], dtype=x.dtype, device=x.device)
        return fake_quantize_rows(x.reshape(1, -1), s, z, qmin, qmax, binary=False).reshape(x.shape)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zero_point: int, qmin: int, qmax: int, container: str) -> Any:
        dtype = _TORCH_CONTAINERS[container]
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max
        if (qmin, qmax) != (lo, hi):  # clip in the float domain: ends of the grid, exactly
            bounds = [g.op("Constant", value_t=torch.tensor((code - zero_point) * scale, dtype=torch.float32))
                      for code in (qmin, qmax)]
            x = g.op("Clip", x, *bounds)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


_TORCH_CONTAINERS = {"INT8": torch.int8, "UINT8": torch.uint8, "INT16": torch.int16, "UINT16": torch.uint16}


class _ExportQuantizer(nn.Module):
    """Stands in for a calibrated :class:`ActivationQuantizer` during export (same outputs, exportable)."""

    def __init__(self, quantizer: ActivationQuantizer, opset: int, where: str) -> None:
        super().__init__()
        spec = quantizer.spec
        if spec.is_binary:
            raise ValueError(f"the input quantizer of {where!r} is 1-bit (sign times scale), which ONNX "
                             "QuantizeLinear/DequantizeLinear cannot express; use 2 or more activation bits")
        self.args = (float(quantizer.scale.reshape(())), int(quantizer.zero_point.reshape(())), spec.qmin, spec.qmax,
                     code_container(spec.qmin, spec.qmax, opset, f"the input quantizer of {where!r}",
                                allow_small=False).name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQ.apply(x, *self.args) if x.is_floating_point() else x


class _ExportEWGS(nn.Module):
    """Stands in for a finalized EWGS input quantizer during export: the same arithmetic, in the same
    order, as plain tensor ops (Sub, Div, Clip, Mul, Round, Add) that the exporter traces."""

    def __init__(self, quantizer: EWGSActivationQuantizer) -> None:
        super().__init__()
        self.register_buffer("lower", quantizer.lower.detach().clone())
        self.register_buffer("upper", quantizer.upper.detach().clone())
        self.levels = quantizer.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        width = (self.upper - self.lower).clamp_min(MIN_SCALE)
        return torch.round(torch.clamp((x - self.lower) / width, 0.0, 1.0) * self.levels) / self.levels * width \
            + self.lower


def _swap_activation_quantizers(model: nn.Module, opset: int) -> int:
    count = 0
    for name, module in model.named_modules():
        quantizer = getattr(module, ATTR, None)
        if isinstance(quantizer, ActivationQuantizer):
            if quantizer.observing:
                raise ValueError(f"the input quantizer of {name!r} is still calibrating: run calibration "
                                 "batches and finish_calibration() first (qready.ptq does)")
            setattr(module, ATTR, _ExportQuantizer(quantizer, opset, name))
            count += 1
        elif isinstance(quantizer, EWGSActivationQuantizer):
            setattr(module, ATTR, _ExportEWGS(quantizer))
            count += 1
    return count


class _Traced(nn.Module):
    """What the exporter traces for a model taking keyword inputs (passed here positionally, in
    ``names`` order): the model's output tensor (``.logits`` of a Hugging Face output). Its weights'
    initializers are named ``TRACED_PREFIX + state_dict key``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return output_tensor(forward(self.model, dict(zip(self.names, args, strict=True))))


def _torch_export(model: nn.Module, example_input: Inputs, opset: int) -> bytes:
    if isinstance(example_input, torch.Tensor):
        traced, args, input_names = model, (example_input,), ["input"]
    else:
        input_names = list(example_input)
        traced, args = _Traced(model, input_names), tuple(example_input.values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            traced, args, buffer, dynamo=False, opset_version=min(opset, TORCH_EXPORTER_MAX_OPSET),
            training=torch.onnx.TrainingMode.PRESERVE, input_names=input_names, output_names=["output"],
            dynamic_axes={**{n: {0: "batch"} for n in input_names}, "output": {0: "batch"}},
        )
    return buffer.getvalue()


def _check_opset(opset: int | None, onnx: Any) -> int:
    highest = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, highest)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ValueError(f"opset must be None or an int in [{MIN_OPSET}, {highest}]; got {opset!r}")
    return opset


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: str | os.PathLike,
    *,
    w_bits: int = 8,
    opset: int | None = None,
    spec: QuantSpec | None = None,
    select: Selector | dict | None = None,
    weights_only: bool = False,
    block_size: int = 32,
) -> Path:
    """Write ``model`` as an ONNX QDQ file at ``path`` and return the path (see the module docstring).

    Args:
        model: a quantized float32 model (weights on their grid, activation quantizers calibrated);
            it is not modified (a copy is exported in eval mode, on the CPU).
        example_input: one input batch ``[B, ...]``, or a dict of tensor keyword arguments (Hugging Face
            ``{"input_ids": ..., "attention_mask": ...}``; each becomes a graph input of that name).
            The batch dimension is exported as dynamic; the graph's output is the model's output
            tensor (``.logits`` of a Hugging Face output).
        w_bits: bit width of the weights' grid (used when ``spec`` is None).
        opset: ONNX opset (default 21, or the installed onnx's highest if lower); >= 13. INT4/UINT4
            weight codes need >= 21; with less, 4-bit codes are stored in INT8/UINT8.
        spec: the weights' quantizer (granularity ``"tensor"`` or ``"channel"``; per channel, each layer's
            output-channel axis comes from :mod:`qready.quant.layers`, leave ``spec.axis`` at 0); default
            ``QuantSpec(bits=w_bits, granularity="channel")``. A layer's ``Selector`` bit override
            applies as in :func:`qready.ptq`.
        select: which layers' weights are encoded (a :class:`~qready.quant.Selector` or its kwargs).
        weights_only: Linear weights with 2, 4 or 8 bits as ONNX Runtime's block-quantized
            ``MatMulNBits`` (``spec`` may then be ``"group"``-wise), other weights as 8-bit QDQ
            (see :mod:`qready.export.onnx_weights`); activation quantizers are refused.
        block_size: ``MatMulNBits`` block along the input features (16, 32, 64, 128 or 256).
    Raises:
        ImportError: onnx is not installed (``pip install 'qready[export]'``).
        ValueError: invalid arguments, a weight still parametrized by QAT, an uncalibrated activation
            quantizer, or 16-bit activations below opset 21.
    """
    onnx = _onnx()
    check_bits(w_bits, "w_bits", WEIGHT_BITS)
    if spec is None:
        spec = QuantSpec(bits=w_bits, granularity="channel")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or None; got {type(spec).__name__}")
    if spec.granularity not in ("tensor", "channel", *(("group",) if weights_only else ())) or spec.axis != 0:
        raise ValueError("export_onnx supports weight granularity 'tensor' or 'channel' (axis 0; also 'group' "
                         "with weights_only=True); got "
                         f"granularity={spec.granularity!r}, axis={spec.axis}")
    if not isinstance(example_input, torch.Tensor) and not (
            isinstance(example_input, Mapping) and example_input
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example_input.items())):
        raise TypeError("example_input must be a tensor or a non-empty dict of tensor keyword arguments; "
                        f"got {type(example_input).__name__}")
    opset = _check_opset(opset, onnx)
    selector = as_selector(select)

    work = copy.deepcopy(model).cpu().float().eval()
    if weights_only:
        from .onnx_weights import encode_weights_only

        encodings, nbits, labels = encode_weights_only(work, spec, selector, opset, block_size)
    else:
        encodings, labels, nbits = *encode_weights(work, spec, selector, opset), []
    n_act = _swap_activation_quantizers(work, opset)
    proto = onnx.load_from_string(_torch_export(work, move_inputs(example_input, "cpu"), opset))
    if opset > TORCH_EXPORTER_MAX_OPSET:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
    names = {e.key: find_initializer(proto.graph, e, onnx.numpy_helper)[0].name for e in [*encodings, *nbits]}
    nodes = [node for enc in encodings for node in rewrite_weight(proto.graph, enc, onnx)]
    for node in reversed(nodes):  # before every consumer: they only read initializers
        proto.graph.node.insert(0, node)
    if nbits:
        from .onnx_weights import add_nbits

        add_nbits(proto, nbits)
    for key, value in ((METADATA_KEY, labels), (NAMES_KEY, names)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("exported %s: %d quantized weights, %d activation quantizers, opset %d",
             target, len(encodings), n_act, opset)
    return target


def weight_encodings(path: str | os.PathLike) -> dict[str, str]:
    """How :func:`export_onnx` stored each selected weight of the file at ``path`` (``{key: label}``)."""
    onnx = _onnx()
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path} has no {METADATA_KEY!r} metadata; it was not written by export_onnx")


__all__ = ["export_onnx", "weight_encodings"]
