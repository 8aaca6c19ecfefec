"""Core ML export: an ``.mlpackage`` whose compressed weights are qready's own LUTs, indices, codes and scales.

:func:`export_coreml` traces the model with ``torch.jit.trace``, converts it with coremltools to a
Core ML program (``mlprogram``), then replaces the constant weight of every selected layer by a
compile-time decompression op built from qready's arrays (nothing is re-clustered or re-quantized by
coremltools):

* **palettized** weights (``spec=None``; found with :func:`~qready.quant.palettize.find_palette`):
  ``constexpr_lut_to_dense`` with the layer's centroids as the LUT and its indices. From iOS 18 the LUT
  may be per grouped output channels (``[G, 1, ..., 2^b, 1]``); before, one LUT per tensor. Index widths
  are those Core ML has (1, 2, 3, 4, 6, 8 bits from iOS 18; 1, 2, 4, 6, 8 before); a palette of another
  width is stored in the next wider one (the extra LUT entries repeat the last centroid: exact).
* **linearly quantized** weights (``spec`` given, as passed to :func:`qready.ptq`):
  ``constexpr_blockwise_shift_scale`` (iOS 18+; int4/uint4/int8/uint8 codes, per tensor, per channel or
  per block) or ``constexpr_affine_dequantize`` (iOS 16/17; 8-bit, per tensor or per channel) holding
  qready's codes, scales and zero points.

What Core ML cannot hold is refused with a ``ValueError`` naming the layer and the nearest supported
setting (a linear bit width other than 4/8, 4-bit or per-block codes or per-group LUTs before iOS 18,
a group size that does not tile the weight); a selected weight that is neither palettized nor on
``spec``'s grid is refused too: nothing falls back to float silently.
BatchNorm is not folded into the convolutions (that would change the quantized weights).
The encoding of each weight is recorded in the model's ``user_defined_metadata["qready.weights"]``;
:mod:`qready.export.decode` reads the file back and compares it with the model bit for bit.

With ``precision="float16"`` the float parts of the program (and the LUTs and scales) are float16;
indices and codes are unchanged, LUT entries and scales are rounded to float16.
An ``.mlpackage`` can be written on Linux but only run on Apple platforms.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..quant.activations import ATTR
from ..quant.layers import layer_spec, out_axis
from ..quant.palettize.codebook import Palette, distinct_values, find_palette
from ..quant.select import Selector, as_selector
from ..quant.spec import QuantParams, QuantSpec
from .bitpack import pack_bits
from .packed import exact_uniform
from .weights import selected_weights

log = logging.getLogger("qready.export")

METADATA_KEY = "qready.weights"
DEFAULT_TARGET = "iOS18"
TARGETS = ("iOS16", "iOS17", "iOS18", "iOS26")
PRECISIONS = ("float32", "float16")
LUT_BITS_IOS18 = (1, 2, 3, 4, 6, 8)
LUT_BITS_IOS16 = (1, 2, 4, 6, 8)
# Passes that would rewrite a weight constant (fold BatchNorm/scales/biases into the conv weight).
_WEIGHT_CHANGING_PASSES = ("common::fuse_conv_batchnorm", "common::fuse_conv_scale", "common::fuse_conv_bias")


def _coremltools() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("coremltools").setLevel(logging.ERROR)
            import coremltools
    except ImportError as e:
        raise ImportError("Core ML export needs coremltools: pip install 'qready[coreml]'") from e
    return coremltools


def is_ios18(target: str) -> bool:
    """True when ``target`` (one of :data:`TARGETS`) has the iOS 18 compression ops."""
    return TARGETS.index(target) >= TARGETS.index("iOS18")


@dataclass
class CoreMLWeight:
    """How one weight is stored: ``kind`` ``"lut"`` (``lut [G, 2^bits]``, ``indices`` as the weight,
    ``group_size`` channels per LUT or ``None``) or ``"linear"`` (``codes`` as the weight; ``scale`` and
    ``offset`` shaped for Core ML's broadcast: same rank as the weight, each dim dividing it)."""

    key: str
    value: np.ndarray  # the weight (float32), to find its constant in the program
    kind: str
    bits: int  # bits of the stored indices / codes
    arrays: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- encoding


def _lut_widths(target: str) -> tuple[int, ...]:
    return LUT_BITS_IOS18 if is_ios18(target) else LUT_BITS_IOS16


def _palette(name: str, w: torch.Tensor, target: str, axis: int) -> Palette:
    palette = find_palette(w, max_bits=8, axis=axis)
    if palette is not None and distinct_values(w, palette.group_size, axis)[1].numel() == w.numel():
        palette = None  # no value shared within a LUT group: a float weight with few elements, not a palette
    if palette is None:
        raise ValueError(f"the weight of {name!r} is not palettized (more than 256 distinct values per channel "
                         "group, or no value shared within a group): palettize the layer (qready.palettize), pass "
                         "the spec it was quantized with (spec=), or leave it out of select=")
    if not is_ios18(target) and palette.group_size is not None:
        distinct = distinct_values(w, None)[1].numel()
        if distinct > 256:
            raise ValueError(f"the weight of {name!r} has one LUT per {palette.group_size} output channel(s); "
                             f"{target} holds one LUT per tensor: use minimum_deployment_target='iOS18' or "
                             "palettize the layer with granularity='tensor'")
        palette = find_palette(w, bits=max(1, math.ceil(math.log2(distinct))), axis=axis)
    width = next(b for b in _lut_widths(target) if b >= palette.bits)
    if width != palette.bits:
        log.info("export_coreml: %r has a %d-bit palette; Core ML stores it with %d-bit indices", name,
                 palette.bits, width)
        palette = _widen(palette, width)
    return palette


def _widen(palette: Palette, bits: int) -> Palette:
    """The same palette with ``2^bits`` LUT entries per group (the last entry repeated)."""
    pad = palette.lut[:, -1:].expand(-1, (1 << bits) - palette.lut.shape[1])
    return Palette(lut=torch.cat([palette.lut, pad], dim=1), indices=palette.indices, group_size=palette.group_size,
                   axis=palette.axis)


def _lut_weight(key: str, name: str, w: torch.Tensor, target: str, axis: int) -> CoreMLWeight:
    palette = _palette(name, w, target, axis)
    lut, size = palette.lut, palette.group_size
    channels = w.shape[axis]
    if size is not None and channels % size:  # Core ML groups must tile the axis: one LUT row per channel
        lut, size = lut[torch.arange(channels) // size], 1
    return CoreMLWeight(key=key, value=w.numpy(), kind="lut", bits=palette.bits,
                        arrays={"lut": lut.float().numpy(), "indices": palette.indices.numpy()},
                        info={"group_size": size, "axis": axis})


def block_shape(shape: tuple[int, ...], params: QuantParams) -> tuple[int, ...]:
    """Shape of the scale tensor in Core ML's block layout (same rank as the weight, each dim dividing
    it) for qready's scale groups ``params``; ``ValueError`` when the groups are not such blocks."""
    if params.granularity == "tensor":
        return (1,) * len(shape)
    axis = params.axis
    rest = shape[:axis] + shape[axis + 1:]  # a channel's elements, in qready's row order
    blocks = (1,) * len(rest) if params.granularity == "channel" else _blocks(rest, params.group_size or 0)
    if blocks is None:
        fits = [g for g in range(1, math.prod(rest) + 1) if _blocks(rest, g) is not None]
        nearest = min(fits, key=lambda g: (abs(g - params.group_size), -g))
        raise ValueError(f"group_size={params.group_size} does not tile the weight's channels of shape "
                         f"{tuple(rest)} into Core ML blocks; nearest supported: group_size={nearest}")
    return blocks[:axis] + (shape[axis],) + blocks[axis:]


def _blocks(rest: tuple[int, ...], size: int) -> tuple[int, ...] | None:
    """Scale counts per dim of ``rest`` when groups of ``size`` consecutive elements are Core ML blocks
    (a block of dim ``j`` times all later dims), else ``None``."""
    for j in range(len(rest)):
        inner = math.prod(rest[j + 1:])
        if size % inner == 0 and rest[j] % (size // inner) == 0:
            return (*rest[:j], rest[j] // (size // inner)) + (1,) * (len(rest) - j - 1)
    return None


def _linear_weight(key: str, name: str, w: torch.Tensor, spec: QuantSpec, target: str) -> CoreMLWeight:
    allowed = (4, 8) if is_ios18(target) else (8,)
    if spec.bits not in allowed:
        nearest = min(allowed, key=lambda b: (abs(b - spec.bits), -b))
        raise ValueError(f"the weight of {name!r}: Core ML ({target}) stores linearly quantized weights with "
                         f"{' or '.join(map(str, allowed))}-bit codes, not {spec.bits}: quantize it at "
                         f"bits={nearest}, or export with spec=None to store its grid as a {spec.bits}-bit LUT")
    if not is_ios18(target) and spec.granularity == "group":
        raise ValueError(f"the weight of {name!r}: per-block scales need minimum_deployment_target='iOS18' "
                         f"({target} has per-tensor and per-channel scales)")
    found = exact_uniform(w, spec)
    if found is None:
        raise ValueError(f"the weight of {name!r} is not on the grid of {spec}: quantize the model with that "
                         "spec first (qready.ptq), or pass spec=None for palettized models")
    codes, params = found
    try:
        shape = block_shape(tuple(w.shape), params)
    except ValueError as err:
        raise ValueError(f"the weight of {name!r}: {err}") from None
    dtype = np.int8 if spec.symmetric else np.uint8
    moved = (shape[params.axis], *shape[:params.axis], *shape[params.axis + 1:])  # qready's group order
    arrays = {"codes": codes.numpy().astype(dtype),
              **{part: np.moveaxis(t.numpy().reshape(moved), 0, params.axis).astype(np_type) for part, t, np_type in
                 (("scale", params.scale.float(), np.float32), ("offset", params.zero_point, dtype))}}
    return CoreMLWeight(key=key, value=w.numpy(), kind="linear", bits=spec.bits, arrays=arrays,
                        info={"granularity": params.granularity, "symmetric": spec.symmetric})


def encode_weights(model: nn.Module, spec: QuantSpec | None, selector: Selector, target: str
                   ) -> list[CoreMLWeight]:
    """qready's encoding of every selected weight for ``target`` (see the module docstring)."""
    out: list[CoreMLWeight] = []
    for item, key, w in selected_weights(model, selector):
        if spec is None:
            out.append(_lut_weight(key, item.name, w, target, out_axis(item.module) or 0))
        else:
            w_spec = layer_spec(item.module, spec if item.bits_override is None else spec.with_bits(item.bits_override))
            out.append(_linear_weight(key, item.name, w, w_spec, target))
    return out


# ------------------------------------------------------------------------------ program rewrite


def _as_precision(array: np.ndarray, precision: str) -> np.ndarray:
    return array.astype(np.float16 if precision == "float16" else np.float32)


def _find_const(ops: list[Any], enc: CoreMLWeight, precision: str) -> Any:
    want = _as_precision(enc.value, precision)
    named = [op for op in ops if op.name == enc.key]
    for op in named + ops:
        val = op.outputs[0].val
        if isinstance(val, np.ndarray) and val.shape == want.shape and val.dtype == want.dtype \
                and np.array_equal(val, want):
            return op
    raise ValueError(f"export_coreml: cannot find the weight {enc.key!r} in the converted program")


def _constexpr(mb: Any, types: Any, enc: CoreMLWeight, target: str, precision: str, before: Any, name: str) -> Any:
    a = enc.arrays
    if enc.kind == "lut":
        lut = _as_precision(a["lut"], precision)
        if is_ios18(target):
            along = [1] * enc.value.ndim
            along[enc.info["axis"]] = lut.shape[0]
            table = lut.reshape(*along, lut.shape[1], 1)
            indices = a["indices"].astype(types.nptype_from_builtin(types.string_to_builtin(f"uint{enc.bits}")))
            return mb.constexpr_lut_to_dense(indices=indices, lut=table, before_op=before, name=name)
        packed = pack_bits(torch.from_numpy(a["indices"]).reshape(-1), enc.bits).numpy()
        return mb.constexpr_lut_to_dense(indices=packed, lut=lut.reshape(-1),
                                         shape=np.array(enc.value.shape, dtype=np.uint32), before_op=before, name=name)
    scale = _as_precision(a["scale"], precision)
    if is_ios18(target):
        small = {(4, np.int8): types.np_int4_dtype, (4, np.uint8): types.np_uint4_dtype}.get(
            (enc.bits, a["codes"].dtype.type))
        codes, offset = (a["codes"], a["offset"]) if small is None else (a["codes"].astype(small),
                                                                          a["offset"].astype(small))
        return mb.constexpr_blockwise_shift_scale(data=codes, scale=scale,
                                                  offset=offset if np.any(a["offset"]) else None,
                                                  before_op=before, name=name)
    per_tensor = scale.size == 1
    return mb.constexpr_affine_dequantize(
        quantized_data=a["codes"], zero_point=a["offset"].reshape(()) if per_tensor else a["offset"].reshape(-1),
        scale=scale.reshape(()) if per_tensor else scale.reshape(-1), axis=0, before_op=before, name=name)


def op_name(index: int) -> str:
    """Name of the decompression op of the ``index``-th encoded weight (Core ML names are identifiers)."""
    return f"qready_weight_{index}"


def _rewrite(prog: Any, encodings: list[CoreMLWeight], target: str, precision: str) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    fn = prog.functions["main"]
    consts = [op for op in fn.operations if op.op_type == "const"]
    with fn, mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["qready_weights"])):
        for index, enc in enumerate(encodings):
            old = _find_const(consts, enc, precision)
            new = _constexpr(mb, types, enc, target, precision, old, op_name(index))
            fn.replace_uses_of_var_after_op(anchor_op=old, old_var=old.outputs[0], new_var=new)
            fn.remove_ops([old])
            consts.remove(old)


# --------------------------------------------------------------------------------------- API


def _check_options(target: object, precision: object) -> None:
    if target not in TARGETS:
        raise ValueError(f"minimum_deployment_target must be one of {list(TARGETS)}; got {target!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")


def _save_package(mlmodel: Any, target: Path) -> None:
    """Write the package next to ``target`` and move it into place (replacing an older one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        mlmodel.save(str(tmp / target.name))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_coreml(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    minimum_deployment_target: str = DEFAULT_TARGET,
    precision: Literal["float32", "float16"] = "float32",
    spec: QuantSpec | None = None,
    select: Selector | dict | None = None,
) -> Path:
    """Write ``model`` as a Core ML ``.mlpackage`` at ``path`` and return the path (see the module docstring).

    Args:
        model: a palettized (``spec=None``) or linearly quantized (``spec``) float32 model, finalized
            (no parametrizations); it is not modified (a copy is traced in eval mode, on the CPU).
        example_input: one input batch ``[B, ...]``; the Core ML input ``"input"`` has this fixed shape.
        path: the ``.mlpackage`` directory to write (replaced if it exists).
        minimum_deployment_target: ``"iOS16"``, ``"iOS17"``, ``"iOS18"`` (default: per-group LUTs,
            3-bit indices, 4-bit and per-block codes) or ``"iOS26"``.
        precision: ``"float32"`` (LUTs and scales exactly qready's) or ``"float16"`` (rounded to float16).
        spec: the weights' uniform quantizer (as given to :func:`qready.ptq`); ``None`` stores palettes.
            A layer's ``Selector`` bit override applies as in :func:`qready.ptq`.
        select: which layers' weights are encoded (a :class:`~qready.quant.Selector` or its kwargs);
            every selected weight must be palettized / on ``spec``'s grid.
    Raises:
        ImportError: coremltools is not installed (``pip install 'qready[coreml]'``).
        ValueError: invalid options, or a weight Core ML cannot hold as it is (the message names the
            layer and the nearest supported setting).
    """
    _check_options(minimum_deployment_target, precision)
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or None; got {type(spec).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor; got {type(example_input).__name__}")
    ct = _coremltools()
    work = copy.deepcopy(model).cpu().float().eval()
    for name, module in work.named_modules():
        if getattr(module, ATTR, None) is not None:
            raise ValueError(f"{name!r} quantizes its input (an activation quantizer): Core ML export stores "
                             "quantized weights only; export the weight-only model")
    encodings = encode_weights(work, spec, as_selector(select), minimum_deployment_target)
    x = example_input.detach().cpu().float()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(work, x, check_trace=False)
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes(list(_WEIGHT_CHANGING_PASSES))
        target = getattr(ct.target, minimum_deployment_target)
        fp = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
        prog = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(x.shape))],
                          convert_to="milinternal", minimum_deployment_target=target, compute_precision=fp,
                          pass_pipeline=pipeline)
        _rewrite(prog, encodings, minimum_deployment_target, precision)
        mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                             compute_precision=fp, pass_pipeline=ct.PassPipeline.EMPTY)
    layers = {e.key: {"op": op_name(i), "kind": e.kind, "bits": e.bits, **e.info} for i, e in enumerate(encodings)}
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(
        {"target": minimum_deployment_target, "precision": precision, "layers": layers}, sort_keys=True)
    out = Path(path)
    _save_package(mlmodel, out)
    log.info("exported %s: %d compressed weights, %s, %s", out, len(encodings), minimum_deployment_target, precision)
    return out


__all__ = ["export_coreml"]
