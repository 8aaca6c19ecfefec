"""The compress stage of ``qready run``: one handler per kind of compression, found by name.

``compress.method`` is a QAT method (any name of :data:`qready.quant.qat.QAT_METHODS`: prepare, train,
finalize) or a palettization method (any name of :data:`qready.quant.palettize.PALETTIZERS`): ``dkm``
(attach, train, snap), ``cluster`` (train with the cluster regularizer, snap onto its representatives) and
every post-training palettizer (``kmeans``, ...: applied once, no training). A new QAT method or
post-training palettizer needs no change here; a new kind of stage is one registered handler.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..quant.select import Selector
from ..recipe import CompressConfig
from ..registry import Registry
from ..train import TrainConfig, fit


@dataclass
class CompressJob:
    """What a handler needs: the model copy to compress, the recipe block, the training loader, the
    fine-tuning config and the keyword arguments of :func:`qready.fit` shared by every handler."""

    model: nn.Module
    config: CompressConfig
    train_loader: Any
    train_cfg: TrainConfig
    fit_kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def select(self) -> Selector | None:
        c = self.config
        return Selector(first_last=c.first_last) if c.first_last != "same" else None


COMPRESS_STAGES: Registry[nn.Module] = Registry("compress stage")


def compress_kind(method: str) -> str:
    """The handler name of a ``compress.method``."""
    from ..quant.qat import QAT_METHODS

    if method in QAT_METHODS:
        return "qat"
    return method if method in COMPRESS_STAGES else "post_training_palettize"


@COMPRESS_STAGES.register("qat")
def qat_stage(job: CompressJob) -> nn.Module:
    """Quantizers attached, trained (optionally sharpness-aware), then baked in."""
    from ..quant.qat import finalize, prepare_qat, qat_param_groups
    from ..sharpness.build import build_step

    c, options = job.config, dict(job.options)
    delta_update = options.pop("delta_update", None)  # EWGS: re-estimate δ from the Hessian trace
    mixed = options.pop("mixed", None)  # per-layer bit widths within the BOPs of this uniform block
    if mixed is not None:
        model = _prepare_mixed(job, dict(mixed), options)
    else:
        model = prepare_qat(job.model, method=c.method, w_bits=c.w_bits, a_bits=c.a_bits, first_last=c.first_last,
                            calib=job.train_loader, inplace=True, **options)
    fit_kwargs = dict(job.fit_kwargs)
    if delta_update is not None:
        from ..quant.qat.hessian import EWGSDeltaUpdater

        updater = EWGSDeltaUpdater(job.train_loader, **(delta_update or {}))
        updater.update(model)
        fit_kwargs["callbacks"] = [updater]
    groups = qat_param_groups(model, lr=c.quantizer_lr or c.lr)
    fit(model, job.train_loader, job.train_cfg, param_groups=groups, step_strategy=build_step(c.sharpness),
        **fit_kwargs)
    return finalize(model)


def _prepare_mixed(job: CompressJob, search: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    """``options.mixed``: search per-layer bit widths (``search`` holds the arguments of
    :func:`qready.sharpness.search_mixed_precision`; the budget ``target`` defaults to the BOPs of the
    block's uniform configuration), write the per-layer evidence (``mixed_precision.json``/``.md``) next
    to the fine-tuning checkpoints, and attach the QAT quantizers of that configuration."""
    from ..sharpness.bops import LAYER_TYPES, layer_macs
    from ..sharpness.mixed import config_bops, prepare_mixed, search_mixed_precision
    from ..sharpness.mixed_report import write_evidence

    c = job.config
    a_bits = "same" if c.a_bits == c.w_bits else c.a_bits
    example = next(iter(job.train_loader))  # MACs per sample from a real batch: any batch form
    selector = Selector(types=LAYER_TYPES, first_last=c.first_last)
    macs = layer_macs(job.model, example)
    uniform = {item.name: item.bits_override or c.w_bits for item in selector.select(job.model)}
    target = search.pop("target", None) or config_bops(macs, uniform, a_bits)
    result = search_mixed_precision(job.model, job.train_loader, example, target, a_bits=a_bits, select=selector,
                                    **search)
    if job.fit_kwargs.get("run_dir") is not None:
        write_evidence(result.to_dict(macs, a_bits), job.fit_kwargs["run_dir"])
    return prepare_mixed(job.model, result.config, method=c.method, a_bits=a_bits, calib=job.train_loader,
                         inplace=True, **options)


@COMPRESS_STAGES.register("dkm")
def dkm_stage(job: CompressJob) -> nn.Module:
    """Differentiable k-means attached, trained, then snapped to the centroids."""
    from ..quant.palettize import finalize_palettized, palettize

    model = palettize(job.model, bits=job.config.w_bits, method="dkm", select=job.select, inplace=True, **job.options)
    fit(model, job.train_loader, job.train_cfg, **job.fit_kwargs)
    return finalize_palettized(model)


@COMPRESS_STAGES.register("cluster")
def cluster_stage(job: CompressJob) -> nn.Module:
    """Trained with the cluster regularizer (learnable representatives; its default weight unless
    ``options.weight``), then snapped onto the representatives."""
    from ..quant.palettize import palettize
    from ..regularizers import build

    reg = build("cluster", job.model, select=job.select, bits=job.config.w_bits, **job.options)
    fit(job.model, job.train_loader, job.train_cfg, loss_terms=[reg], **job.fit_kwargs)
    return palettize(job.model, bits=job.config.w_bits, method="cluster", reg=reg, inplace=True)


@COMPRESS_STAGES.register("post_training_palettize")
def post_training_palettize_stage(job: CompressJob) -> nn.Module:
    """A post-training palettizer (``kmeans``, ...) applied once; no training."""
    from ..quant.palettize import palettize

    return palettize(job.model, bits=job.config.w_bits, method=job.config.method, select=job.select, inplace=True,
                     **job.options)


def compress_model(model: nn.Module, config: CompressConfig, train_loader: Any, train_cfg: TrainConfig,
                   fit_kwargs: dict[str, Any]) -> nn.Module:
    """Compress a copy of ``model`` as ``config`` says; ``train_cfg`` is the recipe's training config
    (its epochs and lr are replaced by the block's) and ``fit_kwargs`` go to every :func:`qready.fit`."""
    cfg = replace(train_cfg, epochs=max(config.epochs, 1), lr=config.lr, warmup_epochs=0)
    job = CompressJob(copy.deepcopy(model), config, train_loader, cfg, fit_kwargs, dict(config.options))
    return COMPRESS_STAGES.get(compress_kind(config.method))(job)

