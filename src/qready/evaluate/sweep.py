"""One model, many bit widths: PTQ at each setting, evaluated on the same data (accuracy when labelled,
fidelity to the float model always)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from torch import nn

from ..quant.ptq import ptq
from ..quant.select import Selector
from ..quant.spec import ACT_BITS, WEIGHT_BITS, QuantSpec, check_bits
from .fidelity import DEFAULT_CONFIDENCE, FIDELITY_KEYS, fidelity

log = logging.getLogger("qready.sweep")

BitSetting = int | str | tuple[int, int]
_WA_PATTERN = re.compile(r"^[Ww](\d+)(?:[Aa](\d+))?$")


def parse_bit_setting(setting: BitSetting) -> tuple[int, int | None]:
    """``4`` or ``"W4"`` -> ``(4, None)`` (weights only); ``(4, 8)`` or ``"W4A8"`` -> ``(4, 8)``."""
    if isinstance(setting, bool):
        raise TypeError(f"bit setting must be an int, 'W4A8'-style string or (w, a) pair; got {setting!r}")
    if isinstance(setting, int):
        return check_bits(setting, "weight bits", WEIGHT_BITS), None
    if isinstance(setting, str):
        text = setting.strip()
        if text.isdigit():
            return check_bits(int(text), "weight bits", WEIGHT_BITS), None
        match = _WA_PATTERN.match(text)
        if not match:
            raise ValueError(f"bit setting {setting!r} is not an int, 'W4' or 'W4A8'")
        w = check_bits(int(match.group(1)), "weight bits", WEIGHT_BITS)
        return w, (check_bits(int(match.group(2)), "activation bits", ACT_BITS) if match.group(2) else None)
    if isinstance(setting, (tuple, list)) and len(setting) == 2:
        return check_bits(setting[0], "weight bits", WEIGHT_BITS), check_bits(setting[1], "activation bits", ACT_BITS)
    raise TypeError(f"bit setting must be an int, 'W4A8'-style string or (w, a) pair; got {setting!r}")


def setting_label(w_bits: int | None, a_bits: int | None) -> str:
    """``"FP"``, ``"W4"`` or ``"W4A8"``."""
    if w_bits is None:
        return "FP"
    return f"W{w_bits}" if a_bits is None else f"W{w_bits}A{a_bits}"


def sweep(
    model: nn.Module,
    data: Iterable,
    bits: Sequence[BitSetting] = (8, 6, 4, 3, 2),
    spec: QuantSpec | None = None,
    *,
    act_spec: QuantSpec | None = None,
    calib: Iterable | None = None,
    select: Selector | dict | None = None,
    include_fp: bool = True,
    bn_recalibrate: bool = False,
    calib_batches: int = 8,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "rtn",
    bias_correction: bool | str = False,
    method_options: dict | None = None,
    device=None,
) -> list[dict]:
    """Evaluate ``model`` after PTQ at each bit setting.

    Args:
        model: the trained float model (not modified).
        data: evaluation batches of any form of :mod:`qready.batching` (e.g. a test DataLoader); labels
            are optional (without them the rows carry fidelity only).
        bits: settings: ints / ``"W4"`` for weight-only, ``(w, a)`` / ``"W4A8"`` for weights and activations.
        spec: weight quantizer template (its ``bits`` is replaced); default per-channel symmetric min-max.
        act_spec: activation quantizer template; default per-tensor asymmetric with ``spec.range``.
        calib: calibration batches (any form of :mod:`qready.batching`), required when a setting quantizes activations.
        select: which modules to quantize.
        include_fp: add a first row for the float model.
        bn_recalibrate: re-estimate BatchNorm statistics of each quantized model on ``calib``.
        calib_batches: at most this many batches of ``calib`` are used per setting.
        confidence: the float model's top-1 probability from which an input counts as confident.
        method: PTQ method (``"rtn"``, ``"gptq"``; see :data:`qready.quant.ptq.PTQ_METHODS`); ``"gptq"``
            needs ``calib``.
        bias_correction: correct each quantized layer's mean output on ``calib`` (``True``/``"layer"``:
            its own shift; ``"model"``: toward the float model's; see :func:`qready.ptq`).
        method_options: options of ``method`` (e.g. ``{"act_order": True}`` for GPTQ).
    Returns:
        one dict per setting: ``label, w_bits, a_bits, range, granularity, method``, ``accuracy`` (%) and ``loss``
        (``None`` for unlabeled ``data``) and the fidelity to the float model, measured in the same pass:
        ``agreement`` and ``agreement_confident`` (top-1, %), ``confident_n``, ``kl`` (KL(float ‖
        quantized), nats), ``sqnr_db`` (output SQNR, ``inf`` for the float row) and ``cosine`` (see
        :mod:`qready.evaluate.fidelity`).
    """
    spec = spec or QuantSpec(bits=8, granularity="channel")
    settings = [parse_bit_setting(s) for s in bits]
    if any(a is not None for _, a in settings) and calib is None:
        raise ValueError("settings with activation bits (e.g. 'W4A8') need calibration batches: pass calib=")
    act_template = act_spec or QuantSpec(bits=8, symmetric=False, granularity="tensor", range=spec.range)
    rows: list[dict] = []

    def record(w_bits: int | None, a_bits: int | None, qmodel: nn.Module) -> None:
        metrics = fidelity(model, qmodel, data, confidence=confidence, device=device)
        row = {
            "label": setting_label(w_bits, a_bits),
            "w_bits": w_bits,
            "a_bits": a_bits,
            "range": spec.range,
            "granularity": spec.granularity,
            "method": method,
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            **{key: metrics[key] for key in FIDELITY_KEYS},
        }
        log.info("%s: accuracy %s, agreement %.2f%%, KL %.4g", row["label"],
                 "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}%", row["agreement"], row["kl"])
        rows.append(row)

    if include_fp:
        record(None, None, model)
    for w_bits, a_bits in settings:
        a_spec = None if a_bits is None else replace(act_template, bits=a_bits)
        qmodel = ptq(
            model, replace(spec, bits=w_bits), calib=calib, act_spec=a_spec, select=select,
            bn_recalibrate=bn_recalibrate, calib_batches=calib_batches, method=method,
            bias_correction=bias_correction, **(method_options or {}),
        )
        record(w_bits, a_bits, qmodel)
    return rows
