"""Packed export: a model file whose size reflects its bit widths.

``save_packed`` writes one safetensors file. For each selected layer (a :class:`~qready.quant.Selector`):

* palettized (at most ``2^b`` distinct values per LUT group): ``<key>::indices`` (bit-packed ``b``-bit
  indices, uint8) and ``<key>::lut`` (float32 ``[G, 2^b]``);
* uniformly quantized (PTQ/QAT; the parameters PTQ recorded on the layer, detected, or re-derived from a given :class:`~qready.quant.QuantSpec`
  with :func:`qready.quant.quantize`): ``<key>::codes`` (bit-packed ``code - qmin``),
  ``<key>::scale`` (float32 ``[G]``) and ``<key>::zero_point`` (int32 ``[G]``);

where ``<key>`` is the weight's ``state_dict`` key. Everything else (biases, BatchNorm, layers that are
neither) is stored as is. Both encodings reproduce the weights bit for bit (a re-derived scale is
nudged by a few ulps when needed), so the loaded model's outputs equal the saved model's.

Activation quantizers (calibrated PTQ ranges, finalized STE/LSQ steps, finalized EWGS bounds) are kept:
their tensors are stored as is and their kinds in the metadata (``"activations"``, see
:mod:`qready.export.activations`), so :func:`load_packed` re-attaches them and the reloaded model
quantizes its activations exactly as the saved one did. Non-finite tensors are refused.

The safetensors header metadata holds ``"qready"`` (JSON: format, version, the user's ``meta``, how
each layer is encoded and the activation quantizers) and ``"qready_sha256"``: the SHA-256 of the tensor table (names, dtypes,
shapes, offsets; canonical JSON), the ``"qready"`` string and the tensor payload, so it covers
everything but itself.
``load_packed`` checks it before decoding: a truncated or modified file is refused with an error
naming it. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils import parametrize

from ..quant.functional import dequantize, quantize
from ..quant.grid import from_rows, to_rows
from ..quant.layers import layer_spec, out_axis
from ..quant.palettize.codebook import Palette, channel_groups, distinct_values, find_palette, lookup
from ..quant.ptq.params import recorded_codes
from ..quant.select import Selector, as_selector
from ..quant.spec import WEIGHT_BITS, QuantParams, QuantSpec, check_bits
from ..quant.validate import first_nonfinite
from .activations import activation_layout, attach_activation_layout
from .bitpack import pack_bits, unpack_bits

log = logging.getLogger("qready.export")

FORMAT = "qready-packed"
VERSION = 1
META_KEY = "qready"
DIGEST_KEY = "qready_sha256"
SEP = "::"
MAX_ULP_NUDGE = 4


def _nudged(scale: torch.Tensor, steps: int) -> torch.Tensor:
    """``scale`` moved ``steps`` float32 ulps (towards +inf for positive ``steps``)."""
    target = torch.full_like(scale, float("inf") if steps > 0 else float("-inf"))
    for _ in range(abs(steps)):
        scale = torch.nextafter(scale, target)
    return scale


def exact_uniform(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantParams] | None:
    """``(codes, params)`` with ``dequantize(codes, params) == weight`` bit for bit, or ``None`` when
    ``weight`` is not on ``spec``'s grid. Codes and scales are re-derived with :func:`quantize`; a
    scale that is an ulp or so off is nudged (at most :data:`MAX_ULP_NUDGE` ulps)."""
    w = weight.detach().float()
    try:
        codes, params = quantize(w, spec)
    except ValueError:
        return None
    target = to_rows(w, params.granularity, params.axis, params.group_size)
    rows = to_rows(dequantize(codes, params), params.granularity, params.axis, params.group_size)
    if not torch.allclose(rows, target, rtol=1e-5, atol=0.0):
        return None  # off the grid, not merely an ulp off
    scale, done = params.scale.clone(), torch.zeros(params.num_groups, dtype=torch.bool)
    for steps in [0, *[s for k in range(1, MAX_ULP_NUDGE + 1) for s in (k, -k)]]:
        trial = _nudged(params.scale, steps)
        rows = to_rows(dequantize(codes, replace(params, scale=trial)), params.granularity, params.axis,
                       params.group_size)
        exact = (rows == target).all(dim=1) & ~done
        scale = torch.where(exact, trial, scale)
        done |= exact
        if bool(done.all()):
            return codes, replace(params, scale=scale)
    return None


def signed_grid(weight: torch.Tensor, max_bits: int = 8, axis: int = 0) -> tuple[torch.Tensor, QuantParams] | None:
    """``(codes, params)`` of a symmetric per-channel grid (zero point 0, channels along ``axis``, at most
    ``max_bits`` bits) with ``dequantize(codes, params) == weight`` bit for bit, or ``None``.

    This recovers grids whose step was learned rather than derived from the weight's range (LSQ
    weights ``round(clip(w / s)) · s``, whose largest code need not be used): each channel's step is
    ``a / k`` for its smallest non-zero magnitude ``a`` and the smallest ``k`` in ``1 .. 2^(b-1)``
    (nudged by up to :data:`MAX_ULP_NUDGE` ulps) that reproduces every value of the channel.
    """
    w = weight.detach().float()
    if w.dim() == 0 or w.numel() == 0 or not bool(torch.isfinite(w).all()):
        return None
    rows = to_rows(w, "channel", axis)
    magnitude = rows.abs()
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(dim=1)
    smallest = torch.where(torch.isinf(smallest), torch.ones_like(smallest), smallest)  # all-zero channel
    half = 2 ** (max_bits - 1)
    scale, done = torch.ones_like(smallest), torch.zeros(rows.shape[0], dtype=torch.bool)
    for k in range(1, half + 1):
        for steps in [0, *[s for j in range(1, MAX_ULP_NUDGE + 1) for s in (j, -j)]]:
            trial = _nudged(smallest / k, steps)
            codes = torch.round(rows / trial[:, None])
            exact = (codes * trial[:, None] == rows).all(dim=1) & (codes.abs() <= half).all(dim=1) & ~done
            scale = torch.where(exact, trial, scale)
            done |= exact
        if bool(done.all()):
            break
    if not bool(done.all()):
        return None
    codes = torch.round(rows / scale[:, None])
    lo, hi = int(codes.min()), int(codes.max())
    bits = next(b for b in range(2, max_bits + 1) if -(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1)
    params = QuantParams(scale=scale, zero_point=torch.zeros_like(scale, dtype=torch.int32), bits=bits,
                         qmin=-(2 ** (bits - 1)), qmax=2 ** (bits - 1) - 1, granularity="channel",
                         shape=tuple(w.shape), axis=axis)
    codes = from_rows(codes, tuple(w.shape), "channel", axis).to(torch.int32)
    return (codes, params) if torch.equal(dequantize(codes, params), w) else None


def _uniform_entry(key: str, codes: torch.Tensor, params: QuantParams, dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    shifted = (codes.to(torch.int32) - params.qmin).to(torch.uint8)
    tensors = {
        f"{key}{SEP}codes": pack_bits(shifted, params.bits),
        f"{key}{SEP}scale": params.scale.float().contiguous(),
        f"{key}{SEP}zero_point": params.zero_point.to(torch.int32).contiguous(),
    }
    info = {"kind": "uniform", "bits": params.bits, "shape": list(params.shape), "dtype": str(dtype).removeprefix("torch."),
            "granularity": params.granularity, "axis": params.axis, "group_size": params.group_size,
            "qmin": params.qmin, "qmax": params.qmax, "binary": bool(params.extra.get("binary"))}
    return tensors, info


def _lut_entry(key: str, palette: Palette, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{key}{SEP}indices": pack_bits(palette.indices, palette.bits),
               f"{key}{SEP}lut": palette.lut.float().contiguous()}
    info = {"kind": "lut", "bits": palette.bits, "shape": list(palette.indices.shape),
            "dtype": str(dtype).removeprefix("torch."), "group_size": palette.group_size, "axis": palette.axis}
    return tensors, info


def _entry_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _auto_uniform(weight: torch.Tensor, axis: int) -> tuple[torch.Tensor, QuantParams] | None:
    """The first per-channel grid along ``axis`` (symmetric, then asymmetric; fewest bits) that
    reproduces ``weight``."""
    if weight.dim() == 0:
        return None
    most = int(torch.bincount(distinct_values(weight, 1, axis)[0]).max())
    for bits in range(max(1, math.ceil(math.log2(most))), max(WEIGHT_BITS) + 1):
        specs = ([QuantSpec(bits=1, axis=axis)] if bits == 1 else
                 [QuantSpec(bits=bits, axis=axis), QuantSpec(bits=bits, symmetric=False, axis=axis)])
        for spec in specs:
            found = exact_uniform(weight, spec)
            if found is not None:
                return found
    return signed_grid(weight, axis=axis)


def _encode(name: str, module: nn.Module, key: str, weight: torch.Tensor, spec_or_bits: QuantSpec | int | None,
            override: int | None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The packed tensors and metadata of one selected weight (channels along ``module``'s
    output-channel axis), or ``None`` to store it as is."""
    axis = out_axis(module) or 0
    if isinstance(spec_or_bits, QuantSpec):
        spec = layer_spec(module, spec_or_bits if override is None else spec_or_bits.with_bits(override))
        found = recorded_codes(module, weight, spec) or exact_uniform(weight, spec)
        if found is None:
            raise ValueError(f"the weight of {name!r} is not on the grid of {spec}; quantize the model with "
                             "that spec first (qready.ptq) or pass spec_or_bits=None to detect encodings")
        return _uniform_entry(key, *found, weight.dtype)
    bits = override if override is not None else spec_or_bits
    palette = find_palette(weight, bits=bits, axis=axis)
    if palette is None:
        return None
    best = _lut_entry(key, palette, weight.dtype)
    if spec_or_bits is None:
        uniform = recorded_codes(module, weight) or _auto_uniform(weight, axis)
        if uniform is not None:
            candidate = _uniform_entry(key, *uniform, weight.dtype)
            if _entry_bytes(candidate[0]) < _entry_bytes(best[0]):
                best = candidate
    return best


def _check_spec_or_bits(spec_or_bits: object) -> None:
    if spec_or_bits is None or isinstance(spec_or_bits, QuantSpec):
        return
    check_bits(spec_or_bits, "spec_or_bits", WEIGHT_BITS)


def _payload_offset(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def _digest(header: dict, body: str, payload: bytes) -> str:
    """SHA-256 of the tensor table (canonical JSON), the metadata string and the payload."""
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(table, sort_keys=True).encode("utf-8"))
    h.update(body.encode("utf-8"))
    h.update(payload)
    return h.hexdigest()


def _split(blob: bytes) -> tuple[dict, bytes]:
    """``(header, payload)`` of a safetensors blob (``ValueError`` if the header is cut or unreadable)."""
    end = _payload_offset(blob)
    if len(blob) < 8 or end > len(blob):
        raise ValueError("its header is cut short (truncated file?)")
    try:
        header = json.loads(blob[8:end])
    except ValueError:
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, blob[end:]


def save_packed(model: nn.Module, path: str | os.PathLike, *, spec_or_bits: QuantSpec | int | None = None,
                select: Selector | dict | None = None, meta: dict | None = None) -> dict:
    """Write ``model`` as a packed safetensors file (see the module docstring).

    Args:
        model: a palettized or quantized model (finalized: no parametrizations left); its activation
            quantizers, if any, are saved with it.
        path: output file.
        spec_or_bits: ``None`` detects each selected layer's encoding (LUT or uniform grid, fewest bytes);
            an int ``b`` stores layers with at most ``2^b`` distinct values per LUT group as ``b``-bit
            LUT indices; a :class:`QuantSpec` stores uniform codes re-derived with that spec (a layer off
            its grid is an error).
        select: which layers to encode (default: every weight-bearing layer type of
            :mod:`qready.quant.layers`); others are stored as is.
        meta: JSON-serialisable information kept in the file; ``{"model": name, "model_kwargs": {...}}``
            lets :func:`load_packed` rebuild the model with :func:`qready.models.create_model`.
    Returns:
        ``{"path", "bytes", "layers": {name: "lut" | "uniform" | "float"}}``.
    """
    _check_spec_or_bits(spec_or_bits)
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ValueError(f"module {name!r} still has parametrizations; finalize the model first "
                             "(qready.quant.finalize_palettized or qready.finalize)")
    try:
        json.dumps(meta or {}, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"meta must be JSON-serialisable: {err}") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise ValueError(f"cannot save a packed model with non-finite tensors: {bad}")
    activations = activation_layout(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    kinds: dict[str, str] = {}
    for item in as_selector(select).select(model):
        key = f"{item.name}.weight" if item.name else "weight"
        encoded = _encode(item.name, item.module, key, state[key], spec_or_bits, item.bits_override)
        kinds[item.name] = "float" if encoded is None else encoded[1]["kind"]
        if encoded is not None:
            tensors.update(encoded[0])
            layers[key] = encoded[1]
            del state[key]
    tensors.update({k: v.clone().contiguous() for k, v in state.items()})
    body = json.dumps({"format": FORMAT, "version": VERSION, "meta": meta or {}, "layers": layers,
                       "activations": activations}, sort_keys=True)
    header, payload = _split(st_save(tensors, metadata={META_KEY: body}))
    digest = _digest(header, body, payload)
    blob = st_save(tensors, metadata={META_KEY: body, DIGEST_KEY: digest})
    final_header, final_payload = _split(blob)
    if _digest(final_header, body, final_payload) != digest:
        raise RuntimeError("safetensors laid the tensors out differently on the second pass")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, target)
    log.debug("wrote %s (%d bytes, %d packed layers)", target, len(blob), len(layers))
    return {"path": str(target), "bytes": len(blob), "layers": kinds}


def _read_verified(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``qready`` metadata and tensors of a packed file, after checking its digest."""
    blob = path.read_bytes()
    refuse = f"{path} is not a valid qready packed file"
    try:
        header, payload = _split(blob)
    except ValueError as err:
        raise ValueError(f"{refuse}: {err}") from None
    metadata = header.get("__metadata__") or {}
    body, digest = metadata.get(META_KEY), metadata.get(DIGEST_KEY)
    if not isinstance(body, str) or not isinstance(digest, str):
        raise ValueError(f"{refuse}: it has no qready metadata")
    if _digest(header, body, payload) != digest:
        raise ValueError(f"{refuse}: SHA-256 mismatch (the file is truncated or was modified)")
    info = json.loads(body)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(f"{refuse}: format {info.get('format')!r} version {info.get('version')!r} "
                         f"(expected {FORMAT!r} version {VERSION})")
    try:
        tensors = st_load(blob)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{refuse}: {err}") from None
    return info, tensors


def _decode(key: str, info: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(info["shape"])
    n = math.prod(shape)
    dtype = getattr(torch, info["dtype"])
    if info["kind"] == "lut":
        indices = unpack_bits(tensors[f"{key}{SEP}indices"], info["bits"], n).reshape(shape)
        groups = channel_groups(shape, info["group_size"], axis=info.get("axis", 0))
        return lookup(indices, tensors[f"{key}{SEP}lut"], groups).to(dtype)
    codes = unpack_bits(tensors[f"{key}{SEP}codes"], info["bits"], n).to(torch.int32) + info["qmin"]
    params = QuantParams(scale=tensors[f"{key}{SEP}scale"], zero_point=tensors[f"{key}{SEP}zero_point"],
                         bits=info["bits"], qmin=info["qmin"], qmax=info["qmax"], granularity=info["granularity"],
                         shape=shape, axis=info["axis"], group_size=info["group_size"],
                         extra={"binary": info["binary"]})
    return dequantize(codes.reshape(shape), params, dtype)


def read_packed_meta(path: str | os.PathLike) -> dict:
    """The verified ``qready`` metadata of a packed file (format, version, ``meta``, ``layers``)."""
    return _read_verified(Path(path))[0]


def load_packed(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a model from a :func:`save_packed` file (eval mode): decoded weights and the saved
    activation quantizers, so its outputs equal those of the saved model.

    Args:
        path: the packed file; it is refused (``ValueError`` naming it) when its digest does not match.
        model_factory: builds the empty model; default: ``create_model(meta["model"], **meta["model_kwargs"])``
            from the ``meta`` given to :func:`save_packed`.
    """
    path = Path(path)
    info, tensors = _read_verified(path)
    state = {k: v for k, v in tensors.items() if SEP not in k}
    for key, layer in info["layers"].items():
        state[key] = _decode(key, layer, tensors)
    if model_factory is None:
        meta = info.get("meta") or {}
        if not isinstance(meta.get("model"), str):
            raise ValueError(f"{path} does not name its model (save it with meta={{'model': name, "
                             "'model_kwargs': {...}}}); pass model_factory=")
        from ..models import create_model

        model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    else:
        model = model_factory()
    attach_activation_layout(model, info.get("activations") or {})
    model.load_state_dict(state, strict=True)
    return model.eval()
