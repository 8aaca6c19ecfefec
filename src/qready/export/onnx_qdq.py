"""ONNX weight encodings of :func:`qready.export.export_onnx`: which integer container holds a grid's
codes, each weight as integer codes for a ``DequantizeLinear`` (``qdq``) or as uint8 indices into a float
look-up table (``lut``), and the graph rewrite that puts them in place of the float initializers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant.layers import layer_spec, out_axis
from ..quant.palettize.codebook import channel_groups, find_palette
from ..quant.select import Selector
from ..quant.spec import QuantSpec
from .packed import exact_uniform, signed_grid
from .weights import selected_weights

log = logging.getLogger("qready.export")

INT4_OPSET = 21  # INT4/UINT4 and INT16/UINT16 in QuantizeLinear/DequantizeLinear
TRACED_PREFIX = "model."  # initializer names of a model traced through a keyword-input wrapper


@dataclass(frozen=True)
class Container:
    """The ONNX integer type holding codes in ``[lo, hi]``."""

    name: str  # ONNX TensorProto type name
    numpy: Any
    lo: int
    hi: int


def containers(opset: int) -> list[Container]:
    import ml_dtypes  # installed with onnx >= 1.16

    small = [Container("INT4", ml_dtypes.int4, -8, 7), Container("UINT4", ml_dtypes.uint4, 0, 15)]
    wide = [Container("INT16", np.int16, -(2**15), 2**15 - 1), Container("UINT16", np.uint16, 0, 2**16 - 1)]
    eight = [Container("INT8", np.int8, -128, 127), Container("UINT8", np.uint8, 0, 255)]
    return [*(small if opset >= INT4_OPSET else []), *eight, *(wide if opset >= INT4_OPSET else [])]


def code_container(qmin: int, qmax: int, opset: int, what: str, *, allow_small: bool = True) -> Container:
    for c in containers(opset):
        if c.lo <= qmin and qmax <= c.hi and (allow_small or c.name not in ("INT4", "UINT4")):
            return c
    raise ValueError(f"{what}: codes in [{qmin}, {qmax}] need a 16-bit QuantizeLinear/DequantizeLinear, which "
                     f"needs opset >= {INT4_OPSET}; got opset={opset}")




@dataclass
class WeightEncoding:
    """How one weight is stored: ``kind`` is ``"qdq"`` (codes + DequantizeLinear) or ``"lut"``."""

    key: str
    value: np.ndarray  # the float weight, to find its initializer by value when names differ
    kind: str
    label: str
    arrays: dict[str, np.ndarray]
    axis: int | None = None


def qdq_weight(key: str, w: torch.Tensor, spec: QuantSpec, opset: int, *, allow_small: bool = True
                ) -> WeightEncoding | None:
    found = exact_uniform(w, spec) or signed_grid(w, axis=spec.axis)
    if found is None:
        return None
    codes, params = found
    codes = codes.to(torch.int32)
    zero_point = params.zero_point.to(torch.int32)
    qmin, qmax = params.qmin, params.qmax
    if params.extra.get("binary"):  # values (2c - 1)·scale: codes ±1, zero point 0
        codes, zero_point, qmin, qmax = 2 * codes - 1, torch.zeros_like(zero_point), -1, 1
    c = code_container(qmin, qmax, opset, f"weight {key!r}", allow_small=allow_small)
    per_tensor = params.granularity == "tensor"
    scale = params.scale.float().numpy()
    zp = zero_point.numpy()
    return WeightEncoding(
        key=key, value=w.numpy(), kind="qdq", label=f"{c.name.lower()} (W{params.bits})",
        arrays={"quantized": codes.numpy().astype(c.numpy),
                "scale": scale.reshape(()) if per_tensor else scale,
                "zero_point": (zp.reshape(()) if per_tensor else zp).astype(c.numpy)},
        axis=None if per_tensor else params.axis,
    )


def lut_weight(key: str, w: torch.Tensor, axis: int) -> WeightEncoding | None:
    """uint8 indices into a flat LUT ``[G·K]``; channel ``c`` (along ``axis``) reads from ``offsets[c] = group(c)·K``."""
    if w.dim() < 2:
        return None
    palette = find_palette(w, max_bits=8, axis=axis)
    if palette is None:
        return None
    groups, k = palette.lut.shape
    offsets = torch.zeros(0, dtype=torch.int64)
    if groups > 1:
        element_group = channel_groups(tuple(w.shape), palette.group_size, axis=axis).reshape(w.shape)
        offsets = element_group.amax(dim=[d for d in range(w.dim()) if d != axis], keepdim=True) * k
    if palette.lut.numel() * 4 + w.numel() + offsets.numel() * 8 >= w.numel() * 4:
        return None  # few elements per channel: LUT + indices would be larger than the float weight
    return WeightEncoding(
        key=key, value=w.numpy(), kind="lut", label=f"lut{palette.bits} (uint8 indices)",
        arrays={"indices": palette.indices.numpy(), "lut": palette.lut.float().reshape(-1).numpy(),
                "offsets": offsets.numpy()},
    )


def encode_weights(model: nn.Module, spec: QuantSpec, selector: Selector, opset: int
                    ) -> tuple[list[WeightEncoding], dict[str, str]]:
    encodings: list[WeightEncoding] = []
    labels: dict[str, str] = {}
    for item, key, w in selected_weights(model, selector):
        w_spec = layer_spec(item.module, spec if item.bits_override is None else spec.with_bits(item.bits_override))
        enc = or_lut(qdq_weight(key, w, w_spec, opset), key, item.name, w, out_axis(item.module) or 0,
                     w_spec.bits, labels)
        if enc is not None:
            encodings.append(enc)
    return encodings, labels


def or_lut(enc: WeightEncoding | None, key: str, name: str, w: torch.Tensor, axis: int, bits: int,
           labels: dict[str, str]) -> WeightEncoding | None:
    """``enc``, else the weight's exact look-up table, else ``None`` (the weight stays float; logged); the
    chosen encoding's label is recorded in ``labels[key]``."""
    enc = enc or lut_weight(key, w, axis)
    if enc is None:
        log.warning("export_onnx: the weight of %r is on neither the %d-bit grid nor a palette; it stays float",
                    name, bits)
    labels[key] = "float" if enc is None else enc.label
    return enc


# ------------------------------------------------------------------------------- graph rewrite


def find_initializer(graph: Any, enc: WeightEncoding, numpy_helper: Any) -> tuple[Any, bool]:
    """The initializer holding ``enc``'s weight and whether it is stored transposed (2-D MatMul)."""
    by_name = {init.name: init for init in graph.initializer}
    for name in (enc.key, f"{TRACED_PREFIX}{enc.key}"):
        if name in by_name:  # transposed: a weight encoded as [N, K] whose layer holds [K, N] (HF Conv1D)
            init = by_name[name]
            same = tuple(init.dims) == enc.value.shape and np.array_equal(numpy_helper.to_array(init), enc.value)
            return init, not same and enc.value.ndim == 2
    for init in graph.initializer:
        if tuple(init.dims) == enc.value.shape and np.array_equal(numpy_helper.to_array(init), enc.value):
            return init, False
        if enc.value.ndim == 2 and tuple(init.dims) == enc.value.shape[::-1] and np.array_equal(
                numpy_helper.to_array(init), enc.value.T):
            return init, True
    raise ValueError(f"export_onnx: cannot find the initializer of {enc.key!r} in the exported graph")


def rewrite_weight(graph: Any, enc: WeightEncoding, onnx: Any) -> list[Any]:
    """Replace the weight's initializer by its encoding; returns the nodes that recompute it."""
    from onnx import helper, numpy_helper

    init, transposed = find_initializer(graph, enc, numpy_helper)
    name = init.name
    graph.initializer.remove(init)
    arrays = dict(enc.arrays)
    if enc.kind == "qdq":
        axis = enc.axis
        if transposed:
            arrays["quantized"] = np.ascontiguousarray(arrays["quantized"].T)
            axis = None if axis is None else 1 - axis
        for part in ("quantized", "scale", "zero_point"):
            graph.initializer.append(numpy_helper.from_array(arrays[part], f"{name}_{part}"))
        attrs = {} if axis is None else {"axis": axis}
        return [helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                 [name], name=f"{name}_DequantizeLinear", **attrs)]
    if transposed:
        arrays["indices"] = np.ascontiguousarray(arrays["indices"].T)
        arrays["offsets"] = np.ascontiguousarray(arrays["offsets"].T)
    parts = ("indices", "lut", "offsets") if arrays["offsets"].size else ("indices", "lut")
    for part in parts:
        graph.initializer.append(numpy_helper.from_array(arrays[part], f"{name}_{part}"))
    index = f"{name}_indices_int64"
    nodes = [helper.make_node("Cast", [f"{name}_indices"], [index], to=onnx.TensorProto.INT64, name=f"{name}_Cast")]
    if "offsets" in parts:
        nodes.append(helper.make_node("Add", [index, f"{name}_offsets"], [f"{index}_flat"], name=f"{name}_Add"))
        index = f"{index}_flat"
    nodes.append(helper.make_node("Gather", [f"{name}_lut", index], [name], axis=0, name=f"{name}_Gather"))
    return nodes
