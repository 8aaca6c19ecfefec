"""Hessian traces by Hutchinson's method, and the EWGS gradient-scaling factor ``delta`` they give.

EWGS (Lee et al., 2021) sets, per quantizer, ``delta = (Tr(H) / N) / G`` where ``H`` is the Hessian
of the loss with respect to the quantizer's ``N`` discretized values ``x_q`` (normalised domain) and
``G = 3 * std(dL/dx_q)`` stands for the largest gradient magnitude; ``delta`` is averaged over a few
batches (3 in the authors' code), clipped at 0, and re-estimated once per epoch.

One difference from the authors' code: they estimate each layer's trace with its own Rademacher
probes (one Hessian-vector product per layer per probe). Here one probe ``v = (v_1, ..., v_K)`` over
all quantizers serves every block at once: with independent zero-mean ``v_k``,
``E[v_k^T (H v)_k] = Tr(H_kk)``, so the cost is one Hessian-vector product per probe instead of ``K``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ...batching import batch_inputs, batch_targets, forward, model_device, move_inputs, output_tensor
from ...checks import check_int
from .apply import train_mode_kept
from .quantizers import EWGSMixin


def rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A tensor of independent +/-1 entries with ``like``'s dtype and device."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator)
    return (2 * bits - 1).to(device=like.device, dtype=like.dtype)


def hutchinson_trace(
    grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    samples: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimates of ``Tr(d^2 L / d x_k^2)`` for each block ``x_k`` of ``inputs``, shape ``[K]`` (float64).

    Args:
        grads: ``dL/dx_k`` computed with ``create_graph=True`` (None: ``L`` does not depend on ``x_k``).
        inputs: the tensors ``x_k`` the gradients were taken with respect to.
        samples: Rademacher probes; each costs one Hessian-vector product.
        generator: source of the probes (CPU generator), for reproducibility.
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive int; got {samples!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    traces = torch.zeros(len(inputs), dtype=torch.float64)
    live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return traces
    for _ in range(samples):
        probes = [rademacher(x.shape, generator, x) for x in inputs]
        hv = torch.autograd.grad([grads[k] for k in live], list(inputs), grad_outputs=[probes[k] for k in live],
                                 retain_graph=True, allow_unused=True)
        for k, (h, v) in enumerate(zip(hv, probes, strict=True)):
            if h is not None:
                traces[k] += float((h.detach() * v).sum())
    return traces / samples


def ewgs_quantizers(model: nn.Module) -> list[tuple[str, EWGSMixin]]:
    """``(name, quantizer)`` of every EWGS weight or activation quantizer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EWGSMixin)]


@contextmanager
def _capturing(quantizers: Sequence[EWGSMixin]) -> Iterator[None]:
    for q in quantizers:
        q.capture = True
    try:
        yield
    finally:
        for q in quantizers:
            q.capture = False
            q.captured = None


def estimate_ewgs_deltas(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    max_batches: int = 3,
    samples: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Set every EWGS quantizer's ``delta`` from the Hessian trace; returns ``{quantizer name: delta}``.

    Args:
        model: a model prepared with ``prepare_qat(method="ewgs")``.
        batches: labelled batches, ``(inputs, targets)`` or ``(dict, targets)`` (e.g. the training
            loader); the first ``max_batches`` are used.
        loss_fn: ``loss_fn(outputs, targets)`` on the model's output tensor (``.logits`` of a Hugging
            Face output); default cross-entropy.
        max_batches: batches averaged (the paper's code uses 3).
        samples: Hutchinson probes per batch.
        generator: source of the probes.
    The forward passes run in train mode; BatchNorm statistics and the training mode are restored.
    """
    named = ewgs_quantizers(model)
    if not named:
        raise ValueError(f"{type(model).__name__} has no EWGS quantizers (prepare_qat(method='ewgs'))")
    check_int("max_batches", max_batches, minimum=1)
    loss_fn = loss_fn or F.cross_entropy
    quantizers = [q for _, q in named]
    device = model_device(model)
    sums = torch.zeros(len(named), dtype=torch.float64)
    used = 0
    with train_mode_kept(model):
        for batch in batches:
            if used >= max_batches:
                break
            y = batch_targets(batch, "estimate_ewgs_deltas").to(device)
            x = move_inputs(batch_inputs(batch), device)
            with _capturing(quantizers):
                loss = loss_fn(output_tensor(forward(model, x)), y)
                live = [k for k, q in enumerate(quantizers) if q.captured is not None and q.captured.requires_grad]
                inputs = [quantizers[k].captured for k in live]
                if not inputs:
                    raise RuntimeError("no EWGS quantizer took part in the forward pass")
                grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
                traces = hutchinson_trace(grads, inputs, samples, generator)
            for j, k in enumerate(live):
                g = grads[j]
                spread = 3.0 * float(g.detach().std()) if g is not None and g.numel() > 1 else 0.0
                if spread > 0 and math.isfinite(spread):
                    sums[k] += float(traces[j]) / inputs[j].numel() / spread
            used += 1
    if used == 0:
        raise ValueError("batches yielded no batch")
    deltas = (sums / used).clamp_min(0.0)
    for q, d in zip(quantizers, deltas.tolist(), strict=True):
        q.delta.fill_(d)
    return {name: float(d) for (name, _), d in zip(named, deltas.tolist(), strict=True)}


class EWGSDeltaUpdater:
    """A :func:`qready.train.fit` callback re-estimating EWGS ``delta`` after every ``every`` epochs.

    ``fit(..., callbacks=[EWGSDeltaUpdater(train_loader)])``. ``fit`` calls callbacks after an epoch,
    so the first epoch trains with the initial ``delta``; to follow the paper exactly (an estimate
    before every epoch, the first included) call :meth:`update` once before ``fit``. Adds
    ``ewgs_delta_mean`` to the epoch's metrics.
    """

    def __init__(self, batches: Iterable, loss_fn: Callable | None = None, *, max_batches: int = 3,
                 samples: int = 8, every: int = 1, seed: int = 0) -> None:
        check_int("every", every, minimum=1)
        self.batches = batches
        self.loss_fn = loss_fn
        self.max_batches = max_batches
        self.samples = samples
        self.every = every
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, model: nn.Module) -> dict[str, float]:
        """Estimate and set every quantizer's ``delta`` now."""
        return estimate_ewgs_deltas(model, self.batches, self.loss_fn, max_batches=self.max_batches,
                                    samples=self.samples, generator=self.generator)

    def __call__(self, epoch: int, metrics: dict, model: nn.Module) -> None:
        if (epoch + 1) % self.every:
            return
        deltas = self.update(model)
        metrics["ewgs_delta_mean"] = sum(deltas.values()) / len(deltas)
