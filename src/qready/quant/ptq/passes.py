"""Calibration passes that collect layer input statistics, and the sequential schedule.

Sequential GPTQ needs each layer's statistics from inputs produced by the already-quantized layers
before it. :class:`SequentialPasses` does that with bounded memory:

* layers are taken in the order the forward pass first calls them, in *blocks* of consecutive layers
  reading the very same input tensor (e.g. query/key/value projections): one pass captures a block;
* a pass over the calibration batches stops as soon as the block has seen its inputs (the rest of the
  forward pass is skipped), so the cost of a block is the forward pass up to it;
* inside an ``nn.Sequential`` called once per forward (a CNN's feature stack, a ResNet stage) the
  input of the container is cached for all calibration batches and advanced child by child: a block
  inside child ``i`` then costs a pass through child ``i`` only, and a layer that *is* a child reads the
  cached input directly. At most one such cached activation of the calibration set (plus the next
  one while advancing) is held at a time, besides one block's Hessians.

Without ``nn.Sequential`` containers (or for layers outside them) the cost is one forward pass, up
to the block, per block of layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...batching import Inputs, forward, model_device, move_inputs
from .capture import LayerStats, StatsCollector

Run = Callable[[nn.Module, Any], Any]


class _Stop(Exception):
    """Raised by a capture hook once everything needed from this forward pass has been seen."""


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def run_model(model: nn.Module, inputs: Inputs) -> Any:
    """Forward one calibration batch (any batch form) on the model's device."""
    return forward(model, move_inputs(inputs, model_device(model)))


def run_module(module: nn.Module, x: torch.Tensor) -> Any:
    """Forward one cached activation through a child module."""
    return module(x)


def _forward_all(module: nn.Module, inputs: list, run: Run) -> None:
    for x in inputs:
        try:
            run(module, x)
        except _Stop:
            pass


@torch.no_grad()
def execution_blocks(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Inputs,
                     watch: list[tuple[str, nn.Module]] = ()) -> tuple[list[list[str]], dict[str, int]]:
    """Layers in the order the forward pass first calls them, grouped into blocks of consecutive layers
    that read the very same input tensor; also how many times each layer (and each ``watch`` module) is
    called per forward. Layers the forward pass never calls are left out."""
    calls: dict[str, int] = {}
    blocks: list[list[str]] = []
    last: dict[str, torch.Tensor | None] = {"input": None}
    targets = {name for name, _ in layers}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in targets:
                return
            x = _first_tensor(args)
            if calls[name] == 1:
                if blocks and x is not None and x is last["input"]:
                    blocks[-1].append(name)
                else:
                    blocks.append([name])
            last["input"] = x
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in [*layers, *watch]]
    try:
        run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return blocks, calls


@torch.no_grad()
def capture_stats(module: nn.Module, layers: list[tuple[str, nn.Module]], inputs: list, *, with_hessian: bool,
                  calls: dict[str, int] | None = None, run: Run = run_model) -> dict[str, LayerStats]:
    """Forward ``inputs`` through ``module`` (with ``run``) and return each layer's input statistics.

    With ``calls`` (calls per forward of each layer) each forward pass stops as soon as every layer of
    ``layers`` has been called that many times.
    """
    collectors = {name: StatsCollector(layer, with_hessian) for name, layer in layers}
    seen = dict.fromkeys(collectors, 0)

    def hook(name: str):
        def add(_module: nn.Module, args: tuple) -> None:
            x = _first_tensor(args)
            if x is not None:
                collectors[name].add(x)
            seen[name] += 1
            if calls is not None and all(seen[n] >= calls.get(n, 1) for n in seen):
                raise _Stop
        return add

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    try:
        for x in inputs:
            seen.update(dict.fromkeys(seen, 0))
            _forward_all(module, [x], run)
    finally:
        for h in handles:
            h.remove()
    return {name: c.stats for name, c in collectors.items() if c.stats is not None}


@torch.no_grad()
def capture_inputs(module: nn.Module, target: nn.Module, inputs: list, run: Run) -> list[torch.Tensor]:
    """The first positional input of ``target`` for each of ``inputs`` forwarded through ``module``
    (each pass stops there)."""
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = target.register_forward_pre_hook(grab)
    try:
        _forward_all(module, inputs, run)
    finally:
        handle.remove()
    return captured


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class SequentialPasses:
    """Runs the sequential schedule (see the module docstring), calling ``finish(name, stats)`` for each
    layer once its statistics are known (``finish`` quantizes the layer in place)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], with_hessian: bool,
                 finish: Callable[[str, LayerStats | None], None]) -> None:
        self.layers = dict(layers)
        self.with_hessian = with_hessian
        self.finish = finish
        self.calls: dict[str, int] = {}
        self.sequentials: dict[str, nn.Module] = {}

    @torch.no_grad()
    def run(self, model: nn.Module, batches: list, blocks: list[list[str]], calls: dict[str, int]) -> None:
        """Quantize every layer of ``blocks`` (from :func:`execution_blocks` with the ``nn.Sequential``
        containers of ``model`` watched) in order."""
        self.calls = calls
        self.sequentials = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Sequential)}
        self._opaque(model, "", batches, run_model, blocks)

    def _container(self, prefix: str, block: list[str]) -> str | None:
        """The outermost ``nn.Sequential`` strictly inside ``prefix``, called once per forward, holding
        every layer of ``block``."""
        found = [name for name in self.sequentials
                 if self.calls.get(name) == 1 and (not prefix or name.startswith(prefix + "."))
                 and all(_inside(layer, name) and layer != name for layer in block)]
        return min(found, key=len) if found else None

    def _opaque(self, module: nn.Module, prefix: str, inputs: list, run: Run, blocks: list[list[str]]) -> None:
        i = 0
        while i < len(blocks):
            container = self._container(prefix, blocks[i])
            if container is None:
                block = blocks[i]
                stats = capture_stats(module, [(n, self.layers[n]) for n in block], inputs,
                                      with_hessian=self.with_hessian, calls=self.calls, run=run)
                for name in block:
                    self.finish(name, stats.get(name))
                i += 1
                continue
            inner = []
            while i < len(blocks) and all(_inside(n, container) for n in blocks[i]):
                inner.append(blocks[i])
                i += 1
            cached = capture_inputs(module, self.sequentials[container], inputs, run)
            self._sequential(self.sequentials[container], container, cached, inner)

    def _sequential(self, seq: nn.Module, prefix: str, xs: list[torch.Tensor], blocks: list[list[str]]) -> None:
        children = list(seq.named_children())
        for index, (key, child) in enumerate(children):
            name = f"{prefix}.{key}"
            mine = [b for b in blocks if all(_inside(n, name) for n in b)]
            if mine == [[name]] and name in self.layers:  # the child is the layer: its input is cached
                collector = StatsCollector(child, self.with_hessian)
                for x in xs:
                    collector.add(x)
                self.finish(name, collector.stats)
            elif mine and isinstance(child, nn.Sequential):
                self._sequential(child, name, xs, mine)
            elif mine:
                self._opaque(child, name, xs, run_module, mine)
            later = any(_inside(n, f"{prefix}.{k}") for k, _ in children[index + 1:] for b in blocks for n in b)
            if not later:
                return
            xs = [child(x) for x in xs]
