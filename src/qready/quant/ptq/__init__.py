"""Post-training quantization back-end: weights onto the grid from a trained model and a few batches."""

from .apply import ptq

__all__ = ["ptq"]
