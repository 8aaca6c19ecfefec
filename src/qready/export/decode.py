"""Read exported files back and check them against the model: Core ML ``.mlpackage`` and ONNX.

:func:`read_coreml` and :func:`read_onnx` open a written file (not the exporter's in-memory state),
extract each compressed weight's stored integers (LUT indices or codes), LUTs, scales and zero points,
and decode them with the file format's own arithmetic (implemented here, independently of qready's
quantizers). :func:`verify_coreml` and :func:`verify_onnx` compare, for every selected weight,

* the decoded values with the model's weight, bit for bit (for a float16 Core ML file: LUT weights equal
  the float16-rounded weights; linear weights ``fp16(scale)·code`` are within :data:`FP16_RTOL` of them);
* the stored integers and tables with qready's own encoding of that weight;

and :func:`verify_onnx` also runs the file in ONNX Runtime against the PyTorch model. A mismatch
raises ``ValueError`` naming the layer.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant.layers import out_axis
from ..quant.select import Selector, as_selector
from ..quant.spec import QuantSpec

FP16_RTOL = 2.0**-11  # float16 rounding of a scale (unit roundoff)


@dataclass
class StoredWeight:
    """One weight as read from a file: ``kind`` (``"lut"``, ``"linear"``, ``"matmul_nbits"``, ``"qdq"``),
    ``bits`` of the stored integers (for Q/DQ: the container, 8 or 4), the stored arrays (unpacked to
    one integer per element), the decoded float values (in the stored layout: a MatMul's weight is
    transposed) and the MatMulNBits ``block_size``."""

    key: str
    kind: str
    bits: int
    arrays: dict[str, np.ndarray]
    values: np.ndarray
    block_size: int | None = None
    outputs_first: bool | None = None  # a matmul weight stored [N, K] (True) or [K, N] (False); None: other


def _expand(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Core ML's block broadcast: ``table`` (same rank, each dim dividing ``shape``) repeated to ``shape``."""
    for axis, (size, blocks) in enumerate(zip(shape, table.shape, strict=True)):
        table = np.repeat(table, size // blocks, axis=axis)
    return table


# ----------------------------------------------------------------------------------- Core ML


def _coreml_program(path: Path) -> tuple[dict, Any]:
    from .coreml import METADATA_KEY, _coremltools

    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    meta = mlmodel.user_defined_metadata.get(METADATA_KEY)
    if meta is None:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata; it was not written by export_coreml")
    spec = mlmodel.get_spec()
    prog = load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    return json.loads(meta), prog


def _decode_coreml_op(key: str, op: Any) -> StoredWeight:
    from coremltools.converters.mil.mil import types

    if op.op_type == "constexpr_lut_to_dense" and "shape" in op.inputs:  # iOS 16: packed indices, one LUT
        from .bitpack import unpack_bits

        lut = np.asarray(op.lut.val).reshape(1, -1)
        shape = tuple(int(d) for d in op.shape.val)
        bits = int(lut.shape[1]).bit_length() - 1
        indices = unpack_bits(torch.from_numpy(np.asarray(op.indices.val, np.uint8)), bits,
                              int(np.prod(shape))).numpy().reshape(shape)
        return StoredWeight(key, "lut", bits, {"indices": indices, "lut": lut}, lut[0][indices])
    if op.op_type == "constexpr_lut_to_dense":  # iOS 18: lut [1, .., G (channel axis), .., 1, 2^b, 1]
        indices = np.asarray(op.indices.val).astype(np.uint8)
        table = np.asarray(op.lut.val)
        grouped = [d for d, size in enumerate(table.shape[:-2]) if size != 1]
        if table.shape[-1] != 1 or len(grouped) > 1:
            raise ValueError(f"{key!r}: LUT of shape {table.shape} is not per grouped channels of one axis")
        axis = grouped[0] if grouped else 0
        lut = table.reshape(table.shape[axis], table.shape[-2])
        view = [1] * indices.ndim
        view[axis] = -1
        rows = np.repeat(np.arange(lut.shape[0]), indices.shape[axis] // lut.shape[0]).reshape(view)
        bits = int(types.builtin_to_string(op.indices.dtype).removeprefix("uint"))
        return StoredWeight(key, "lut", bits, {"indices": indices, "lut": lut}, lut[rows, indices])
    if op.op_type == "constexpr_blockwise_shift_scale":
        data = np.asarray(op.data.val)
        scale = np.asarray(op.scale.val)
        offset = np.zeros(scale.shape, data.dtype) if op.offset is None else np.asarray(op.offset.val)
        bits = types.builtin_to_string(op.data.dtype).removeprefix("u").removeprefix("int")
        diff = data.astype(np.float32) - _expand(offset, data.shape).astype(np.float32)
        return StoredWeight(key, "linear", int(bits), {"codes": data, "scale": scale, "offset": offset},
                            diff * _expand(scale, data.shape))
    if op.op_type == "constexpr_affine_dequantize":
        data = np.asarray(op.quantized_data.val)
        view = [1] * data.ndim
        view[int(op.axis.val)] = -1
        scale = np.asarray(op.scale.val).reshape(view if np.asarray(op.scale.val).size > 1 else [1] * data.ndim)
        offset = np.asarray(op.zero_point.val).reshape(scale.shape)
        values = (data.astype(np.float32) - offset.astype(np.float32)) * scale
        return StoredWeight(key, "linear", 8, {"codes": data, "scale": scale, "offset": offset}, values)
    raise ValueError(f"{key!r} is stored by an op {op.op_type!r} that qready does not write")


def read_coreml(path: str | os.PathLike) -> tuple[dict, dict[str, StoredWeight]]:
    """``(metadata, {weight key: StoredWeight})`` of an ``.mlpackage`` written by ``export_coreml``."""
    meta, prog = _coreml_program(Path(path))
    ops = {op.name: op for op in prog.functions["main"].operations}
    out = {}
    for key, layer in meta["layers"].items():
        if layer["op"] not in ops:
            raise ValueError(f"{path}: the op {layer['op']!r} holding {key!r} is missing")
        out[key] = _decode_coreml_op(key, ops[layer["op"]])
    return meta, out


def _mismatch(what: str, key: str) -> ValueError:
    return ValueError(f"the exported {what} of {key!r} differ from qready's")


def verify_coreml(model: nn.Module, path: str | os.PathLike, *, spec: QuantSpec | None = None,
                  select: Selector | dict | None = None) -> dict[str, dict]:
    """Check an ``export_coreml`` file against ``model`` (same ``spec``/``select`` as the export).

    Returns ``{weight key: {"kind", "bits"}}``; raises ``ValueError`` naming the first layer whose
    stored indices/codes, LUT/scales/offsets or decoded values are not qready's, bit for bit."""
    from .coreml import encode_weights

    meta, stored = read_coreml(path)
    half = meta["precision"] == "float16"
    out = {}
    for enc in encode_weights(model.float().cpu(), spec, as_selector(select), meta["target"]):
        if enc.key not in stored:
            raise ValueError(f"{path} does not hold the weight {enc.key!r}")
        got = stored[enc.key]
        want = enc.value.astype(np.float16) if half else enc.value
        if got.kind != enc.kind or got.bits != enc.bits:
            raise _mismatch(f"encoding ({got.kind} {got.bits}-bit)", enc.key)
        ints = "indices" if enc.kind == "lut" else "codes"
        if not np.array_equal(got.arrays[ints].astype(np.int32), enc.arrays[ints].astype(np.int32)):
            raise _mismatch(ints, enc.key)
        for table in ("lut", "scale"):
            if table in enc.arrays:
                ours = enc.arrays[table].astype(np.float16 if half else np.float32)
                if not np.array_equal(got.arrays[table].reshape(ours.shape), ours):
                    raise _mismatch(table, enc.key)
        if "offset" in enc.arrays and not np.array_equal(got.arrays["offset"].astype(np.int32).reshape(-1),
                                                         enc.arrays["offset"].astype(np.int32).reshape(-1)):
            raise _mismatch("zero points", enc.key)
        if half and enc.kind == "linear":  # fp16(scale) * code: within one float16 rounding of the weight
            exact = np.allclose(got.values, enc.value, rtol=FP16_RTOL, atol=0.0)
        else:
            exact = np.array_equal(got.values.astype(want.dtype), want)
        if not exact:
            raise _mismatch("decoded values", enc.key)
        out[enc.key] = {"kind": enc.kind, "bits": enc.bits}
    return out


# -------------------------------------------------------------------------------------- ONNX


def _onnx_tensors(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _decode_nbits(key: str, node: Any, tensors: dict[str, np.ndarray]) -> StoredWeight:
    from onnx import helper

    from .onnx_weights import unpack_rows

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    packed, scales = tensors[node.input[1]], tensors[node.input[2]].reshape(n, -1)
    blocks = scales.shape[1]
    u = unpack_rows(packed, bits, block).reshape(n, blocks * block)
    if len(node.input) > 3 and node.input[3]:
        zero = unpack_rows(tensors[node.input[3]].reshape(n, -1), bits, blocks)
    else:
        zero = np.full((n, blocks), 1 << (bits - 1), np.uint8)
    diff = u.astype(np.float32) - np.repeat(zero, block, axis=1).astype(np.float32)
    values = (diff * np.repeat(scales, block, axis=1))[:, :k]
    raw = {"B": packed, "scales": tensors[node.input[2]]}
    if len(node.input) > 3 and node.input[3]:
        raw["zero_points"] = tensors[node.input[3]]
    return StoredWeight(key, "matmul_nbits", bits, {"codes": u[:, :k], "zero_values": zero, "raw": raw},
                        values, block, outputs_first=True)


def read_onnx(path: str | os.PathLike) -> dict[str, StoredWeight]:
    """``{weight key: StoredWeight}`` of an ONNX file written by ``export_onnx`` (MatMulNBits, QDQ and
    LUT weights; values in the layout of the stored tensor, which a MatMul holds transposed)."""
    from .onnx import NAMES_KEY, _onnx

    proto = _onnx().load(str(path))
    meta = {entry.key: json.loads(entry.value) for entry in proto.metadata_props}
    if NAMES_KEY not in meta:
        raise ValueError(f"{path} has no {NAMES_KEY!r} metadata; it was not written by export_onnx")
    tensors = _onnx_tensors(proto)
    out = {}
    for key, name in meta[NAMES_KEY].items():
        nbits = [node for node in proto.graph.node if node.op_type == "MatMulNBits" and node.input[1] == f"{name}_B"]
        if nbits:
            out[key] = _decode_nbits(key, nbits[0], tensors)
        elif f"{name}_quantized" in tensors:
            codes, scale, zero = (tensors[f"{name}_{p}"] for p in ("quantized", "scale", "zero_point"))
            axis = next((a.i for n in proto.graph.node if n.output[0] == name for a in n.attribute if a.name == "axis"), 1)
            view = [1] * codes.ndim
            if scale.ndim:
                view[axis] = -1
            values = (codes.astype(np.float32) - zero.astype(np.float32).reshape(view)) * scale.reshape(view)
            out[key] = StoredWeight(key, "qdq", 8 * codes.dtype.itemsize,
                                    {"codes": codes, "scale": scale, "zero_point": zero}, values)
        elif f"{name}_lut" in tensors:
            indices, lut = tensors[f"{name}_indices"], tensors[f"{name}_lut"]
            flat = indices.astype(np.int64) + tensors.get(f"{name}_offsets", np.zeros((), np.int64))
            out[key] = StoredWeight(key, "lut", 8, {"indices": indices, "lut": lut}, lut[flat])
        else:
            raise ValueError(f"{path}: cannot find how {key!r} is stored")
        if out[key].outputs_first is None:
            out[key].outputs_first = _matmul_orientation(proto, name)
    return out


def _matmul_orientation(proto: Any, name: str) -> bool | None:
    """For a tensor read as the right-hand side of a MatMul/Gemm: stored ``[N, K]`` (True) or ``[K, N]``."""
    from onnx import helper

    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] == name:
            return False
        if node.op_type == "Gemm" and node.input[1] == name:
            return any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)
    return None


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})[0]


def verify_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | None = None, *,
                spec: QuantSpec | None = None, select: Selector | dict | None = None) -> dict[str, Any]:
    """Check an ``export_onnx`` file against ``model``: every stored weight decodes to the model's weight
    bit for bit, MatMulNBits codes and scales are qready's (with ``spec``: the export's spec and
    ``block_size``, read from the file), and with ``example_input`` ONNX Runtime's output is compared
    with the model's. Returns ``{"layers": {key: kind}, "max_rel_error": float | None}``."""
    from .onnx_weights import nbits_weight

    model = model.float().cpu().eval()
    stored = read_onnx(path)
    weights = {f"{item.name}.weight": item for item in as_selector(select).select(model)}
    layers = {}
    for key, got in stored.items():
        if key not in weights:
            raise ValueError(f"{path} holds {key!r}, which select= does not select")
        item = weights[key]
        w = item.module.weight.detach().float().numpy()
        values = got.values
        if got.outputs_first is not None and got.outputs_first != ((out_axis(item.module) or 0) == 0):
            values = values.T  # a Linear weight is [N, K]; a Hugging Face Conv1D weight is [K, N]
        if not np.array_equal(values, w):
            raise _mismatch("decoded values", key)
        if got.kind == "matmul_nbits" and spec is not None:
            layer_spec = spec if item.bits_override is None else spec.with_bits(item.bits_override)
            rows = w if (out_axis(item.module) or 0) == 0 else w.T
            ours = nbits_weight(key, item.name, torch.from_numpy(np.ascontiguousarray(rows)),
                                replace(layer_spec, axis=0), got.block_size)
            raw = got.arrays["raw"]
            if ours is None or ours.arrays.keys() != raw.keys() or not all(
                    np.array_equal(ours.arrays[part], raw[part]) for part in raw):
                raise _mismatch("MatMulNBits B / scales / zero points", key)
        layers[key] = got.kind
    error = None
    if example_input is not None:
        with torch.no_grad():
            ref = model(example_input.float().cpu()).numpy()
        out = _run_onnx(Path(path), example_input)
        error = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    return {"layers": layers, "max_rel_error": error}
