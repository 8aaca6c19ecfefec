"""``search="reinforce"``: a bit-width policy trained with REINFORCE over a weight-sharing supernet.

Each step samples ``samples`` configurations from the policy (per layer a softmax over the candidate
bit widths; see :mod:`qready.sharpness.policy`), evaluates each on the :class:`~.supernet.Supernet`
and rewards it with ``R(c) = −L_SA(c) − λ·(BOPs(c)/T − 1)²`` (``L_SA``: the sharpness-aware loss on the
search batches). The policy ascends ``Σ (R − b)·∇log π(c) + η·∇H(π)`` with Adam, ``b`` a moving average
of the rewards (``b ← m·b + (1 − m)·mean R``, first value the first mean) and ``H`` the entropy of the
per-layer distributions (summed over layers). Losses are cached per configuration (the supernet is
deterministic in eval mode).

Final choice: ``final`` configurations drawn from the trained policy plus its greedy decoding; those
within the budget are measured and the lowest ``L_SA`` wins. Should no draw fit, each is repaired by
lowering, one step at a time, the layer whose step down saves the most BOPs until it fits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checks import check_float, check_int
from .policy import POLICIES, rollout
from .search import SEARCHES, MixedPrecisionResult, SearchProblem
from .supernet import Supernet

LEARNING_RATES: dict[str, float] = {"independent": 0.2, "lstm": 0.03}


def _repair(problem: SearchProblem, config: Mapping[str, int]) -> dict[str, int]:
    """Lower searched layers one candidate step at a time (largest BOPs saving first) until within budget."""
    config, bits = dict(config), problem.bits
    while problem.bops(config) > problem.target:
        steps = [(problem.bops(config) - problem.bops({**config, n: bits[bits.index(config[n]) - 1]}), n)
                 for n in problem.free if config[n] > bits[0]]
        _, name = max(steps)
        config[name] = bits[bits.index(config[name]) - 1]
    return config


@SEARCHES.register("reinforce")
def reinforce_search(problem: SearchProblem, *, policy: str = "independent", hidden: int = 32,
                     steps: int = 100, samples: int = 8, lr: float | None = None,
                     entropy: float = 0.01, momentum: float = 0.5, final: int = 32, seed: int = 0, method: str = "lsq",
                     range_method: str = "minmax", granularity: str | None = None) -> MixedPrecisionResult:
    """REINFORCE over a supernet (see the module docstring).

    Args:
        problem: the search problem (layers, budget, batches, loss).
        policy: ``"independent"`` (per-layer logits) or ``"lstm"`` (an LSTM over the layers, ``hidden`` units).
        steps, samples: policy updates, and configurations sampled per update.
        lr: Adam learning rate of the policy; None: :data:`LEARNING_RATES` of the policy (an LSTM
            collapses onto one configuration at rates the independent logits need).
        entropy: weight η of the entropy bonus.
        momentum: of the moving-average reward baseline.
        final: configurations drawn from the trained policy for the final choice.
        seed: seeds the policy's initialisation and every draw (same seed, same result).
        method, range_method, granularity: the supernet's quantizers (``prepare_qat``'s ``method``, ``range``
            and ``w_granularity``). The default ranks configurations on exactly the LSQ quantizers
            :func:`prepare_mixed` starts QAT from; for weight-only PTQ use ``method="ste", range_method="mse",
            granularity="channel"`` (the quantizer of :func:`ptq_mixed`).
    """
    factory = POLICIES.get(policy)
    for name, value, low in (("hidden", hidden, 1), ("steps", steps, 1), ("samples", samples, 1),
                             ("final", final, 1), ("seed", seed, 0)):
        check_int(name, value, minimum=low)
    entropy = check_float("entropy", entropy, minimum=0.0)
    momentum = check_float("momentum", momentum, minimum=0.0, maximum=1.0)
    lr = check_float("lr", LEARNING_RATES[policy] if lr is None else lr, minimum=0.0, exclusive=True)
    p, bits, free = problem, problem.bits, problem.free
    net = Supernet(p.model, {n: bits if n in free else [p.fixed[n]] for n in p.layers}, p.a_bits, p.data, len(p.data),
                   method=method, w_granularity=granularity, range=range_method)
    cache: dict[tuple[int, ...], float] = {}

    def loss(config: Mapping[str, int]) -> float:
        key = tuple(config[n] for n in p.layers)
        if key not in cache:
            net.set_config(config)
            cache[key] = p.loss(net.net, net.weights)
        return cache[key]

    def configs(choices: torch.Tensor) -> list[dict[str, int]]:
        return [p.full({n: bits[int(j)] for n, j in zip(free, row, strict=True)}) for row in choices]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        agent = factory(len(free), len(bits), hidden)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(agent.parameters(), lr=lr)
    baseline: float | None = None
    spread = 0.0
    history: list[dict] = []
    for step in range(steps):
        roll = rollout(agent, samples, generator)
        sampled = configs(roll.choices)
        losses = [loss(c) for c in sampled]
        ratios = [p.bops(c) / p.target for c in sampled]
        rewards = torch.tensor([-v - p.penalty(r * p.target) for v, r in zip(losses, ratios, strict=True)])
        mean = float(rewards.mean())
        baseline = mean if baseline is None else momentum * baseline + (1 - momentum) * mean
        advantage = rewards - baseline
        spread = momentum * spread + (1 - momentum) * float(advantage.pow(2).mean())
        advantage = advantage / (spread ** 0.5 + 1e-8)
        objective = (advantage * roll.log_prob).mean() + entropy * roll.entropy.mean()
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
        history.append({"step": step, "reward": mean, "baseline": baseline, "loss": sum(losses) / samples,
                        "bops_ratio": sum(ratios) / samples, "entropy": float(roll.entropy.detach().mean()),
                        "within_budget": sum(r <= 1 for r in ratios) / samples})

    with torch.no_grad():
        drawn = configs(rollout(agent, 1, greedy=True).choices) + configs(rollout(agent, final, generator).choices)
    fitting = [c for c in drawn if p.bops(c) <= p.target] or [_repair(p, c) for c in drawn]
    measured: list[dict] = []
    seen: set[tuple[int, ...]] = set()
    for i, config in enumerate(fitting):
        key = tuple(config.values())
        if key not in seen:
            seen.add(key)
            measured.append(p.row(config, loss(config), "greedy" if i == 0 and config == drawn[0] else "sample"))
    best = min(measured, key=lambda r: r["loss"])
    chosen = torch.tensor([[bits.index(best["config"][n]) for n in free]])
    with torch.no_grad():
        probs = rollout(agent, 1, given=chosen).probs[0]
    probabilities = {n: {b: float(probs[i, k]) for k, b in enumerate(bits)} for i, n in enumerate(free)}
    return MixedPrecisionResult(config=dict(best["config"]), bops=int(best["bops"]), target=float(p.target),
                                loss=best["loss"], objective=best["objective"], candidates=measured, search="reinforce",
                                probabilities=probabilities, history=history)
