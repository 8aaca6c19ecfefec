"""Evaluation: metrics, bit-width sweeps, reports and plots."""

from .fidelity import fidelity
from .metrics import evaluate
from .sweep import parse_bit_setting, setting_label, sweep

__all__ = ["evaluate", "fidelity", "parse_bit_setting", "setting_label", "sweep"]
