"""Clustering regularization with learnable representatives (seed: Malchiodi, Ferraretto, Frasca 2026;
docs/methods/clustering.md).

Each selected layer ``l`` owns ``K = 2^b`` representatives ``c_{l,1..K}`` (``nn.Parameter``\\ s in
:attr:`ClusterRegularizer.reps`, keyed by :func:`param_key`), initialised by the exact 1-D k-means
of the layer's weights and trained by backprop together with the weights. The penalty, summed
over layers (the paper's exact form is not public; this is the project's choice of the family):

* hard (default): ``R_l = mean_i min_k (w_i - c_k)² / σ_l²``. The gradient reaches each weight and
  the representative it is nearest to (pulling both together), computed in ``O(N)`` memory.
* soft (``soft=True``): the soft minimum
  ``R_l = (mean_i [-T·log Σ_k exp(-(w_i - c_k)²/T)] + T·ln K) / σ_l²`` (a log-sum-exp; ``T`` =
  ``temperature · σ_l²``). It lies in ``[min_k d, min_k d + T ln K] / σ_l²`` (so it is >= 0 and tends to
  the hard penalty as ``T → 0``) and every representative gets a gradient weighted by
  ``softmax(-d/T)``, which keeps representatives that are momentarily nobody's nearest alive.

``σ_l²`` is the variance of layer ``l``'s weights when the regularizer is built (a constant buffer;
``normalize=False`` uses 1): the penalty is then the squared clustering error relative to the layer's
spread (about 0.12 for 2-bit k-means of Gaussian weights), so one λ suits layers and models of any
weight scale.

After training, :func:`qready.quant.palettize` with ``method="cluster", reg=this`` snaps every weight
to its nearest representative: each layer then stores ``K`` floats and ``b``-bit indices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_float
from ..quant.palettize.codebook import nearest
from ..quant.palettize.kmeans import kmeans1d_centroids
from ..quant.select import Selector
from ..quant.spec import WEIGHT_BITS, check_bits
from .base import DEFAULT_WEIGHT, REGULARIZERS, Regularizer, param_key


def hard_cluster_penalty(w: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """``mean_i min_k (w_i - c_k)²`` for a weight (any shape) and representatives ``[K]``."""
    flat = w.reshape(-1)
    idx = nearest(flat, reps.detach())
    return (flat - reps[idx]).square().mean()


def soft_cluster_penalty(w: torch.Tensor, reps: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``mean_i -T·logsumexp_k(-(w_i - c_k)²/T) + T·ln K`` (soft minimum; see the module docstring)."""
    d = (w.reshape(-1)[:, None] - reps[None, :]).square()
    soft_min = -temperature * torch.logsumexp(-d / temperature, dim=1)
    return soft_min.mean() + temperature * math.log(reps.numel())


@REGULARIZERS.register("cluster")
class ClusterRegularizer(Regularizer):
    """Pulls each selected layer's weights toward ``2^bits`` learnable representatives.

    Args:
        model: the model (representatives are initialised from its current weights).
        weight: λ.
        select: which layers.
        start_epoch: first active epoch.
        bits: ``b``; ``K = 2^b`` representatives per layer (1-8).
        soft: use the soft minimum instead of the hard one.
        temperature: soft minimum temperature relative to each layer's weight variance.
        normalize: divide each layer's penalty by its initial weight variance.
    """

    name = "cluster"

    def __init__(self, model: nn.Module, weight: float = DEFAULT_WEIGHT, select: Selector | dict | None = None,
                 start_epoch: int = 0, *, bits: int = 2, soft: bool = False, temperature: float = 0.01,
                 normalize: bool = True) -> None:
        super().__init__(model, weight=weight, select=select, start_epoch=start_epoch)
        self.bits = check_bits(bits, "cluster bits", WEIGHT_BITS)
        for flag, value in (("soft", soft), ("normalize", normalize)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool; got {value!r}")
        check_float("temperature", temperature, minimum=0.0, exclusive=True)
        self.soft, self.normalize = soft, normalize
        self.relative_temperature = float(temperature)
        self.reps = nn.ParameterDict()
        self.register_buffer("variances", torch.ones(len(self.layer_names)))
        self.reset_parameters(model)

    @torch.no_grad()
    def reset_parameters(self, model: nn.Module) -> None:
        """(Re)initialise representatives (k-means) and layer variances from ``model``'s current weights."""
        variances = []
        for name, module in self.layers(model):
            w = module.weight.detach().float()
            reps = kmeans1d_centroids(w, 1 << self.bits).to(w.device)
            key = param_key(name)
            if key in self.reps:
                self.reps[key].copy_(reps)
            else:
                self.reps[key] = nn.Parameter(reps)
            variances.append(w.var(unbiased=False).clamp_min(1e-12))
        self.variances.copy_(torch.stack(variances).to(self.variances.device))

    def representatives(self, name: str) -> torch.Tensor:
        """The ``[K]`` representatives of the layer called ``name``."""
        return self.reps[param_key(name)]

    def layer_penalty(self, index: int, name: str, w: torch.Tensor) -> torch.Tensor:
        """The penalty of the ``index``-th selected layer."""
        reps = self.representatives(name).to(w.dtype)
        variance = self.variances[index].to(w.dtype)
        if self.soft:
            value = soft_cluster_penalty(w, reps, self.relative_temperature * variance)
        else:
            value = hard_cluster_penalty(w, reps)
        return value / variance if self.normalize else value

    def penalty(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        terms = [self.layer_penalty(i, name, module.weight) for i, (name, module) in enumerate(self.layers(model))]
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, soft={self.soft}, normalize={self.normalize}, layers={len(self.layer_names)}"
