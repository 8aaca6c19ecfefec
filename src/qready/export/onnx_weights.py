"""Weight-only ONNX export for ONNX Runtime: Linear weights as block-quantized ``MatMulNBits``.

Used by :func:`qready.export.export_onnx` with ``weights_only=True``:

* **Linear** weights (and Hugging Face ``Conv1D``, whose ``[K, N]`` weight is transposed) on the spec's
  grid with 2, 4 or 8 bits become one ``MatMulNBits`` node
  (``com.microsoft`` domain, ONNX Runtime's weight-only kernel) in place of the ``Gemm``/``MatMul``:
  ``B`` uint8 ``[N, K/block, block·bits/8]`` holds qready's codes as unsigned ``u = code - zero point + z``
  (``z = 2^(bits-1)`` for a symmetric grid, whose zero points are then omitted: ORT's default; the
  integer zero point itself for an asymmetric grid, packed ``[N, ceil(K/block · bits / 8)]``), packed
  least significant bits first; ``scales`` float32 ``[N, K/block]``; blocks run along ``K`` (input
  features), ``block`` a power of two in [16, 256]. Per-channel and per-tensor scales repeat over the
  blocks; a ``group`` grid needs ``group_size`` to be a multiple of ``block``. ``K`` is padded to whole
  blocks with codes equal to the zero point (value 0). Bias is added by an ``Add`` after the node.
* other selected weights (Conv, Embedding) become 8-bit QDQ (int8/uint8 codes + ``DequantizeLinear``,
  per channel), or the exact LUT encoding when they are palettized (see :mod:`qready.export.onnx`).

A Linear bit width ``MatMulNBits`` lacks (1, 3, 5, 6, 7) is refused with the nearest supported one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..quant.activations import ATTR
from ..quant.layers import layer_spec, out_axis
from ..quant.select import Selector
from ..quant.spec import QuantSpec
from .packed import exact_uniform
from .weights import selected_weights

NBITS = (2, 4, 8)  # MatMulNBits kernels in ONNX Runtime
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
DOMAIN = "com.microsoft"


@dataclass
class NBitsWeight:
    """One Linear weight ``[N, K]`` as MatMulNBits inputs (``zero_points`` empty when symmetric)."""

    key: str
    value: np.ndarray
    bits: int
    block_size: int
    arrays: dict[str, np.ndarray]
    label: str


def check_block_size(block_size: object) -> int:
    """``block_size`` as an int, or ``ValueError`` naming the allowed values."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {list(BLOCK_SIZES)}; got {block_size!r}")
    return int(block_size)  # type: ignore[call-overload]


def pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[..., M]`` (``M·bits`` a multiple of 8) along the last axis, LSB first."""
    planes = (u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(*u.shape[:-1], -1), axis=-1, bitorder="little")


def unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: the first ``count`` codes of each row (uint8)."""
    planes = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = planes.reshape(*packed.shape[:-1], count, bits)
    return (planes * (1 << np.arange(bits, dtype=np.uint8))).sum(axis=-1, dtype=np.uint8)


def nbits_weight(key: str, name: str, w: torch.Tensor, spec: QuantSpec, block_size: int) -> NBitsWeight | None:
    """The MatMulNBits encoding of a Linear weight ``w`` ``[N, K]``, or ``None`` when ``w`` is not on
    ``spec``'s grid; ``ValueError`` for a grid MatMulNBits cannot hold (naming the layer)."""
    if spec.bits not in NBITS:
        nearest = min(NBITS, key=lambda b: (abs(b - spec.bits), -b))
        raise ValueError(f"the weight of {name!r}: MatMulNBits holds {', '.join(map(str, NBITS))}-bit codes, not "
                         f"{spec.bits}: quantize it at bits={nearest}, or export with weights_only=False "
                         "(QDQ / LUT)")
    found = exact_uniform(w, spec)
    if found is None:
        return None
    codes, params = found
    n, k = w.shape
    blocks = -(-k // block_size)
    if params.granularity == "group":
        if params.group_size % block_size:
            raise ValueError(f"the weight of {name!r}: group_size={params.group_size} is not a multiple of "
                             f"block_size={block_size}: pass block_size={params.group_size} (one of "
                             f"{list(BLOCK_SIZES)}) or quantize with group_size a multiple of {block_size}")
        per_row = params.scale.reshape(n, -1)
        zp_row = params.zero_point.reshape(n, -1)
        repeat = params.group_size // block_size
        scale, zero = per_row.repeat_interleave(repeat, 1)[:, :blocks], zp_row.repeat_interleave(repeat, 1)[:, :blocks]
    else:
        scale = params.scale.reshape(-1, 1).expand(n, blocks)
        zero = params.zero_point.reshape(-1, 1).expand(n, blocks)
    shift = 1 << (spec.bits - 1) if spec.symmetric else 0  # signed codes -> unsigned, zero point -> shift
    u_zero = (zero.to(torch.int32) + shift).numpy().astype(np.uint8)
    u = np.repeat(u_zero, block_size, axis=1)  # padding: codes at the zero point (value 0)
    u[:, :k] = (codes.to(torch.int32) + shift).numpy().astype(np.uint8)
    arrays = {"B": pack_rows(u.reshape(n, blocks, block_size), spec.bits),
              "scales": np.ascontiguousarray(scale.float().numpy())}
    if not spec.symmetric:
        padded = np.zeros((n, -(-blocks * spec.bits // 8) * 8 // spec.bits), np.uint8)
        padded[:, :blocks] = u_zero
        arrays["zero_points"] = pack_rows(padded, spec.bits).reshape(-1)
    return NBitsWeight(key=key, value=w.numpy(), bits=spec.bits, block_size=block_size, arrays=arrays,
                       label=f"matmul_nbits{spec.bits} (block {block_size})")


def encode_weights_only(model: nn.Module, spec: QuantSpec, selector: Selector, opset: int, block_size: int
                        ) -> tuple[list, list[NBitsWeight], dict[str, str]]:
    """``(other encodings, MatMulNBits encodings, labels)`` of the selected weights of ``model``."""
    from .onnx_qdq import or_lut, qdq_weight

    check_block_size(block_size)
    for name, module in model.named_modules():
        if getattr(module, ATTR, None) is not None:
            raise ValueError(f"{name!r} quantizes its input; weights_only=True exports weight-only models: "
                             "use weights_only=False for W/A QDQ")
    others: list = []
    nbits: list[NBitsWeight] = []
    labels: dict[str, str] = {}
    for item, key, w in selected_weights(model, selector):
        w_spec = layer_spec(item.module, spec if item.bits_override is None else spec.with_bits(item.bits_override))
        enc = None
        axis = out_axis(item.module) or 0
        if isinstance(item.module, nn.Linear) or (w.dim() == 2 and axis == 1):  # Linear [N, K]; HF Conv1D [K, N]
            rows = w if axis == 0 else w.T.contiguous()
            enc = nbits_weight(key, item.name, rows, replace(w_spec, axis=0), block_size)
            if enc is not None:
                nbits.append(enc)
                labels[key] = enc.label
                continue
        elif w_spec.granularity != "group":
            enc = qdq_weight(key, w, w_spec, opset, allow_small=False)
        enc = or_lut(enc, key, item.name, w, axis, w_spec.bits, labels)
        if enc is not None:
            others.append(enc)
    return others, nbits, labels


def _consumer(graph, name: str):  # noqa: ANN001, ANN202 - onnx protobuf objects
    users = [node for node in graph.node if name in node.input]
    if len(users) != 1 or users[0].op_type not in ("Gemm", "MatMul"):
        raise ValueError(f"export_onnx: the weight {name!r} feeds {[u.op_type for u in users]}, not one Gemm/MatMul")
    return users[0]


def rewrite_nbits(graph, enc: NBitsWeight) -> None:  # noqa: ANN001 - an onnx GraphProto
    """Replace the ``Gemm``/``MatMul`` reading ``enc``'s weight by ``MatMulNBits`` (+ ``Add`` for a bias)."""
    from onnx import helper, numpy_helper

    from .onnx_qdq import find_initializer

    init, transposed = find_initializer(graph, enc, numpy_helper)
    name = init.name
    node = _consumer(graph, name)
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                or attrs.get("transB", 0) != (0 if transposed else 1) or node.input[1] != name:
            raise ValueError(f"export_onnx: unexpected Gemm attributes {attrs} for the weight {name!r}")
    elif node.input[1] != name or not transposed:
        raise ValueError(f"export_onnx: the weight {name!r} is not the right-hand side of its MatMul")
    graph.initializer.remove(init)
    inputs = [node.input[0]]
    for part in ("B", "scales", "zero_points"):
        if part in enc.arrays:
            graph.initializer.append(numpy_helper.from_array(enc.arrays[part], f"{name}_{part}"))
            inputs.append(f"{name}_{part}")
    n, k = enc.value.shape
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    product = f"{name}_MatMulNBits_out" if bias else out
    new = [helper.make_node("MatMulNBits", inputs, [product], name=f"{name}_MatMulNBits", domain=DOMAIN,
                            K=k, N=n, bits=enc.bits, block_size=enc.block_size)]
    if bias:
        new.append(helper.make_node("Add", [product, bias], [out], name=f"{name}_bias_Add"))
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, item in enumerate(new):
        graph.node.insert(position + offset, item)


def add_nbits(proto, encodings: list[NBitsWeight]) -> None:  # noqa: ANN001 - an onnx ModelProto
    """Rewrite every MatMul/Gemm of ``encodings`` to ``MatMulNBits`` and import the ``com.microsoft`` domain."""
    from onnx import helper

    for enc in encodings:
        rewrite_nbits(proto.graph, enc)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))


__all__ = ["add_nbits", "BLOCK_SIZES", "NBITS", "NBitsWeight", "check_block_size", "encode_weights_only", "nbits_weight",
           "pack_rows", "rewrite_nbits", "unpack_rows"]
