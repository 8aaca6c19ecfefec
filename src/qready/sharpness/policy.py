"""Bit-width policies for the REINFORCE search: per layer, a distribution over the candidate bit widths.

* :class:`IndependentPolicy` -- one free logit vector per layer (layers independent);
* :class:`LSTMPolicy` -- an LSTM over the layers in model order: its input at layer ``l`` is a learned
  embedding of layer ``l`` plus an embedding of the choice made at layer ``l − 1``, so a layer's
  distribution can depend on the bits already given to the layers before it.

Both start uniform (zero logits / a zero output layer). :func:`rollout` samples (or decodes greedily)
configurations as choice indices ``[n, L]`` with their log-probabilities and entropies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import Registry

POLICIES: Registry[nn.Module] = Registry("bit-width policy")


@POLICIES.register("independent")
class IndependentPolicy(nn.Module):
    """Per-layer logits ``[L, K]`` (K candidate bit widths), initialised to zero (uniform)."""

    def __init__(self, layers: int, choices: int, hidden: int = 0) -> None:
        super().__init__()
        self.layers, self.choices = layers, choices
        self.logits = nn.Parameter(torch.zeros(layers, choices))

    def initial_state(self, n: int) -> None:
        return None

    def step(self, layer: int, previous: Tensor, state: None) -> tuple[Tensor, None]:
        """Logits ``[n, K]`` at ``layer`` (``previous``: the choices at ``layer − 1``, ``[n]``; unused)."""
        return self.logits[layer].expand(previous.shape[0], -1), None


@POLICIES.register("lstm")
class LSTMPolicy(nn.Module):
    """An LSTM cell run over the layers; ``hidden`` units; a linear head gives each layer's logits."""

    def __init__(self, layers: int, choices: int, hidden: int = 32) -> None:
        super().__init__()
        self.layers, self.choices, self.hidden = layers, choices, hidden
        self.layer_embed = nn.Embedding(layers, hidden)
        self.choice_embed = nn.Embedding(choices + 1, hidden)  # index `choices`: "no previous layer"
        self.cell = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, choices)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def initial_state(self, n: int) -> tuple[Tensor, Tensor]:
        zeros = self.head.weight.new_zeros(n, self.hidden)
        return zeros, zeros

    def step(self, layer: int, previous: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Logits ``[n, K]`` at ``layer`` given the choices ``previous`` ``[n]`` at ``layer − 1``."""
        x = self.layer_embed.weight[layer] + self.choice_embed(previous)
        h, c = self.cell(x, state)
        return self.head(h), (h, c)


@dataclass
class Rollout:
    """``choices`` ``[n, L]`` (indices into the bit widths), ``log_prob`` ``[n]`` and ``entropy`` ``[n]``
    (sums over layers), ``probs`` ``[n, L, K]`` (each layer's distribution along the rollout)."""

    choices: Tensor
    log_prob: Tensor
    entropy: Tensor
    probs: Tensor


def rollout(policy: nn.Module, n: int, generator: torch.Generator | None = None, greedy: bool = False,
            given: Tensor | None = None) -> Rollout:
    """Sample ``n`` configurations from ``policy`` (``generator`` seeds the draws), decode the most
    likely choice layer by layer (``greedy``), or score the ``given`` choices ``[n, L]``."""
    previous = torch.full((n,), policy.choices, dtype=torch.long)
    state = policy.initial_state(n)
    picks, log_probs, entropies, probs = [], [], [], []
    for layer in range(policy.layers):
        logits, state = policy.step(layer, previous, state)
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        if given is not None:
            pick = given[:, layer]
        elif greedy:
            pick = p.argmax(dim=-1)
        else:
            pick = torch.multinomial(p.detach(), 1, generator=generator).squeeze(1)
        picks.append(pick)
        log_probs.append(logp.gather(1, pick[:, None]).squeeze(1))
        entropies.append(-(p * logp).sum(dim=-1))
        probs.append(p)
        previous = pick
    return Rollout(torch.stack(picks, 1), torch.stack(log_probs, 1).sum(1), torch.stack(entropies, 1).sum(1),
                   torch.stack(probs, 1))
