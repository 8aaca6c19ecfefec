"""Evaluation: metrics, bit-width sweeps, reports and plots."""

from .metrics import evaluate
from .sweep import parse_bit_setting, setting_label, sweep

__all__ = ["evaluate", "parse_bit_setting", "setting_label", "sweep"]
