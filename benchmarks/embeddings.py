"""Should the default Selector quantize embeddings? The cost of quantizing them, measured on a small BERT.

Model: ``BertForSequenceClassification`` built from a config (no download): vocabulary 4000, hidden 64,
2 layers, 2 heads, intermediate 256, sequences of 32 tokens, 4 classes. Task (synthetic, seeded): each
class is a "topic", a Zipf distribution (exponent 1.1) over its own random permutation of the
vocabulary; a sequence mixes 40 % tokens of its topic with 60 % of a shared Zipf background, so
frequent tokens are trained often and rare ones hardly at all, as in real text. The model is trained
with Adam (lr 1e-3, batch 32) for ``STEPS`` steps; the ``init`` rows use the untrained model (Hugging
Face initialisation, N(0, 0.02) for embeddings and Linear weights alike).

Each variant is weight-only round-to-nearest PTQ (symmetric min-max, per channel: one scale per token
row for the embeddings, per output feature for Linear) of one group of layers:

* ``embeddings``: word, position and token-type embeddings only;
* ``linear``: every ``nn.Linear`` only;
* ``all``: both (what the default Selector selects);
* ``embeddings/tensor``: the embeddings with one scale per matrix (what a "channel" buys).

Columns: fidelity to the float model on 1024 held-out sequences (top-1 agreement %, KL(float ‖
quantized) in nats, output SQNR in dB, via :func:`qready.evaluate.fidelity.fidelity`), test accuracy,
and the weights' relative quantization error ``‖W − Q(W)‖² / ‖W‖²`` of the quantized group. Cells are
mean ± std over seeds.

    python -m benchmarks.embeddings [--quick]

One intra-op thread.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.common import markdown_table, mean_std, save_results
from qready.evaluate.fidelity import fidelity
from qready.quant import QuantSpec, Selector, ptq

VOCAB, HIDDEN, TOKENS, CLASSES = 4000, 64, 32, 4
TOPIC_SHARE, ZIPF = 0.4, 1.1
STEPS, BATCH, LR = 600, 32, 1e-3
TEST = 1024
BITS = (8, 6, 4, 3)
EMBEDDINGS = Selector(include=(r"embeddings\.",))
VARIANTS: dict[str, tuple[Selector, str]] = {
    "embeddings": (EMBEDDINGS, "channel"),
    "linear": (Selector(types=(nn.Linear,)), "channel"),
    "all": (Selector(), "channel"),
    "embeddings/tensor": (EMBEDDINGS, "tensor"),
}


def make_model(seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=4 * HIDDEN, max_position_embeddings=TOKENS, num_labels=CLASSES,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config)


class Topics:
    """The synthetic task: per-class Zipf distributions over permuted vocabularies plus a background."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** ZIPF
        zipf /= zipf.sum()
        self.background = zipf[torch.randperm(VOCAB, generator=self.g)]
        self.topics = torch.stack([zipf[torch.randperm(VOCAB, generator=self.g)] for _ in range(CLASSES)])

    def batch(self, size: int) -> tuple[dict, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (size,), generator=self.g)
        topic = torch.multinomial(self.topics[labels], TOKENS, replacement=True, generator=self.g)
        background = torch.multinomial(self.background.expand(size, -1), TOKENS, replacement=True, generator=self.g)
        ids = torch.where(torch.rand(size, TOKENS, generator=self.g) < TOPIC_SHARE, topic, background)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def train(model: nn.Module, data: Topics, steps: int) -> float:
    """Adam on cross-entropy; returns the CPU seconds spent."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    start = time.process_time()
    for _ in range(steps):
        inputs, labels = data.batch(BATCH)
        opt.zero_grad()
        nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        opt.step()
    return time.process_time() - start


@torch.no_grad()
def relative_error(model: nn.Module, qmodel: nn.Module, selector: Selector) -> float:
    """``Σ‖W − Q(W)‖² / Σ‖W‖²`` over the layers ``selector`` picks."""
    names = [item.name for item in selector.select(model)]
    num = sum(float((qmodel.get_submodule(n).weight - model.get_submodule(n).weight).square().sum()) for n in names)
    den = sum(float(model.get_submodule(n).weight.square().sum()) for n in names)
    return num / den


def weight_share(model: nn.Module) -> float:
    """Share of the selected weights (default Selector) that sit in embeddings (percent)."""
    sizes = {item.name: item.module.weight.numel() for item in Selector().select(model)}
    emb = {item.name for item in EMBEDDINGS.select(model)}
    return 100.0 * sum(v for k, v in sizes.items() if k in emb) / sum(sizes.values())


def run_seed(seed: int, steps: int) -> dict:
    model = make_model(seed)
    data = Topics(seed)
    test = [data.batch(128) for _ in range(TEST // 128)]
    out: dict = {"share": weight_share(model), "cells": {}}
    for state in ("init", "trained"):
        if state == "trained":
            out["train_cpu_s"] = train(model, data, steps)
        model.eval()
        out[f"accuracy/{state}"] = fidelity(model, model, test)["accuracy"]
        for variant, (selector, granularity) in VARIANTS.items():
            for bits in BITS:
                q = ptq(model, QuantSpec(bits=bits, granularity=granularity), select=selector)
                fid = fidelity(model, q, test)
                out["cells"][f"{state}|{variant}|W{bits}"] = {
                    "agreement": fid["agreement"], "kl": fid["kl"], "sqnr_db": fid["sqnr_db"],
                    "accuracy": fid["accuracy"], "rel_error": relative_error(model, q, selector)}
    return out


def tables(runs: list[dict]) -> str:
    lines = []
    for state in ("init", "trained"):
        for metric, unit in (("kl", "KL(float ‖ quantized), nats"), ("agreement", "top-1 agreement with float, %"),
                             ("sqnr_db", "output SQNR, dB"), ("accuracy", "test accuracy, %"),
                             ("rel_error", "weight error ‖W − Q(W)‖² / ‖W‖² of the quantized group")):
            if state == "init" and metric == "accuracy":
                continue
            rows = []
            for variant in VARIANTS:
                cells = []
                for bits in BITS:
                    values = [r["cells"][f"{state}|{variant}|W{bits}"][metric] for r in runs]
                    scale = 1e3 if metric == "rel_error" else 1.0
                    cells.append(mean_std([v * scale for v in values]) if metric != "kl" else
                                 f"{sum(values) / len(values):.2e}")
                rows.append([variant, *cells])
            suffix = " (×1e-3)" if metric == "rel_error" else ""
            lines.append(f"### {state}: {unit}{suffix}\n")
            lines.append(markdown_table(["quantized", *[f"W{b}" for b in BITS]], rows))
            lines.append("")
    return "\n".join(lines)


def verdict(runs: list[dict]) -> list[str]:
    """Plain statements computed from the trained-model cells."""
    def kl(variant: str, bits: int) -> float:
        return sum(r["cells"][f"trained|{variant}|W{bits}"]["kl"] for r in runs) / len(runs)

    out = []
    for bits in BITS:
        e, lin, both = kl("embeddings", bits), kl("linear", bits), kl("all", bits)
        out.append(f"- W{bits}: KL from quantizing the embeddings {e:.2e}, the Linear layers {lin:.2e}, both {both:.2e} "
                   f"(embeddings {'below' if e < lin else 'above'} Linear, ratio {e / lin if lin > 0 else float('inf'):.2f}).")
    per_tensor, per_row = kl("embeddings/tensor", 4), kl("embeddings", 4)
    out.append(f"- W4 embeddings per tensor vs per token row: KL {per_tensor:.2e} vs {per_row:.2e}.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 steps (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, steps = ((0,), 100) if args.quick else ((0, 1, 2), STEPS)
    runs = [run_seed(s, steps) for s in seeds]
    share = runs[0]["share"]
    acc = {state: mean_std([r[f"accuracy/{state}"] for r in runs]) for state in ("init", "trained")}
    text = [
        "# Quantizing embeddings: cost on a small BERT\n",
        f"Seeds {list(seeds)}; {steps} training steps (CPU {mean_std([r['train_cpu_s'] for r in runs])} s each); "
        f"float test accuracy init {acc['init']} %, trained {acc['trained']} %. "
        f"Embeddings hold {share:.1f} % of the selected weights. Setup and definitions: `benchmarks/embeddings.py`.\n",
        "## Verdict (trained model)\n", *verdict(runs), "", tables(runs),
    ]
    save_results("embeddings", {"seeds": list(seeds), "steps": steps, "runs": runs}, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
