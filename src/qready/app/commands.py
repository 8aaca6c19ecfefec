"""Commands that present library results: ``qready inspect``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..evaluate.inspect import diagnose
from ..quant.spec import QuantSpec


def inspect_command(ckpt: str, *, batches: int = 4, bits: Sequence[int | str] = (8, 4, 3, 2),
                    as_json: bool = False, data_root: str | None = None) -> int:
    """``qready inspect CKPT``: diagnose every Linear/Conv/Embedding layer of a checkpoint written by
    ``qready train`` (first and last included, flagged) on the first ``batches`` batches of its recipe's
    training loader, with its recipe's PTQ spec (``sweep`` granularity, symmetry, first range method).
    Prints a table and the recommendations, or the :class:`Diagnosis` as JSON with ``as_json``. Returns 0."""
    from ..evaluate.report import print_untruncated
    from .stages import prepare_from_checkpoint

    prepared = prepare_from_checkpoint(Path(ckpt), data_root=data_root)
    cfg = prepared.recipe.sweep
    spec = QuantSpec(bits=8, symmetric=cfg.symmetric, granularity=cfg.granularity, range=cfg.ranges[0],
                     group_size=cfg.group_size)
    diagnosis = diagnose(prepared.model, prepared.train_loader, bits=bits, spec=spec, num_batches=batches)
    if as_json:
        print(diagnosis.to_json())
        return 0
    table = diagnosis.table(title=f"Quantization readiness of {ckpt} ({spec.granularity}, {spec.range})")
    console = print_untruncated(table)
    for line in diagnosis.recommend:
        console.print(f"- {line}", highlight=False)
    return 0
