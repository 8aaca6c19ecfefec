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
  cached input directly;
* once such a container is done, its outputs for the calibration batches are kept and *replayed*
  (returned instead of recomputed) by the later passes of the module that holds it: the layers after
  a finished feature stack, or the residual block around a finished branch, cost only their own part
  of the forward pass. So every layer runs about once on the calibration set.

Memory: one block's Hessians, the cached activation of the container being advanced (advanced in
place, one batch at a time), the inputs of the enclosing modules still to be advanced, and the
replayed outputs of the finished containers of the modules being processed (one per nesting level;
each the size of one activation of the calibration set).

Without ``nn.Sequential`` containers (or for layers outside them) the cost is one forward pass, up
to the block, per block of layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
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


def _forward_until_stop(module: nn.Module, x: Any, run: Run) -> None:
    try:
        run(module, x)
    except _Stop:
        pass


class Replay:
    """Cached outputs of finished containers, served in place of their forward pass.

    ``outputs[module][i]`` is ``module``'s output for calibration batch ``i``; inside :meth:`serving`,
    calling ``module`` returns ``outputs[module][self.index]`` without computing anything (the passes
    iterate the batches through :meth:`batches`, which sets ``index``). An empty replay serves nothing.
    """

    def __init__(self) -> None:
        self.outputs: dict[nn.Module, list] = {}
        self.index = 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Replace the forward of every cached module by a look-up, for the duration of the block."""
        patched = []
        try:
            for module, outputs in self.outputs.items():
                module.forward = self._lookup(outputs)  # an instance attribute shadows the class's forward
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def batches(self, items: Iterable) -> Iterator:
        """``items`` in order, ``index`` following the calibration batch each one belongs to."""
        for index, item in enumerate(items):
            self.index = index
            yield item

    def _lookup(self, outputs: list) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return outputs[self.index]
        return forward


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
                  calls: dict[str, int] | None = None, run: Run = run_model,
                  replay: Replay | None = None) -> dict[str, LayerStats]:
    """Forward ``inputs`` through ``module`` (with ``run``) and return each layer's input statistics.

    With ``calls`` (calls per forward of each layer) each forward pass stops as soon as every layer of
    ``layers`` has been called that many times. ``replay``: finished containers served from cache.
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
        replay = replay or Replay()
        with replay.serving():
            for x in replay.batches(inputs):
                seen.update(dict.fromkeys(seen, 0))
                _forward_until_stop(module, x, run)
    finally:
        for h in handles:
            h.remove()
    return {name: c.stats for name, c in collectors.items() if c.stats is not None}


@torch.no_grad()
def capture_inputs(module: nn.Module, target: nn.Module, inputs: list, run: Run,
                   replay: Replay | None = None) -> list[torch.Tensor]:
    """The first positional input of ``target`` for each of ``inputs`` forwarded through ``module``
    (each pass stops there)."""
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = target.register_forward_pre_hook(grab)
    try:
        replay = replay or Replay()
        with replay.serving():
            for x in replay.batches(inputs):
                _forward_until_stop(module, x, run)
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

    def _opaque(self, module: nn.Module, prefix: str, inputs: list, run: Run, blocks: list[list[str]]) -> Replay:
        """Quantize ``blocks`` inside ``module`` (whose forward we cannot split) given its ``inputs``;
        returns the finished containers' outputs, for replay by whoever forwards ``module`` next."""
        replay = Replay()
        i = 0
        while i < len(blocks):
            container = self._container(prefix, blocks[i])
            if container is None:
                block = blocks[i]
                stats = capture_stats(module, [(n, self.layers[n]) for n in block], inputs,
                                      with_hessian=self.with_hessian, calls=self.calls, run=run, replay=replay)
                for name in block:
                    self.finish(name, stats.get(name))
                i += 1
                continue
            inner = []
            while i < len(blocks) and all(_inside(n, container) for n in blocks[i]):
                inner.append(blocks[i])
                i += 1
            seq = self.sequentials[container]
            cached = capture_inputs(module, seq, inputs, run, replay)
            replay.outputs[seq] = self._sequential(seq, container, cached, inner)
        return replay

    def _sequential(self, seq: nn.Module, prefix: str, xs: list[torch.Tensor], blocks: list[list[str]]) -> list:
        """Quantize ``blocks`` inside the container ``seq`` given its inputs ``xs`` (one per calibration
        batch), advancing them child by child *in place* (each batch's old activation is freed as soon
        as its next one exists); returns ``xs``, then ``seq``'s outputs."""
        for key, child in seq.named_children():
            name = f"{prefix}.{key}"
            mine = [b for b in blocks if all(_inside(n, name) for n in b)]
            replay = Replay()
            if mine == [[name]] and name in self.layers:  # the child is the layer: its input is cached
                collector = StatsCollector(child, self.with_hessian)
                for x in xs:
                    collector.add(x)
                self.finish(name, collector.stats)
            elif mine and isinstance(child, nn.Sequential):
                self._sequential(child, name, xs, mine)
                continue
            elif mine:
                replay = self._opaque(child, name, xs, run_module, mine)
            with replay.serving():
                for index in replay.batches(range(len(xs))):
                    xs[index] = child(xs[index])
        return xs
