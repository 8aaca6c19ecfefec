"""Palettization back-end: weights onto a small LUT (k-means, DKM, learnable representatives)."""

from .apply import finalize_palettized, palettize
from .codebook import Palette, find_palette, nearest, snap
from .dkm import DKMWeight, dkm_naive, dkm_unique
from .gptq import GPTQPalettizer
from .kmeans import kmeans1d
from .methods import PALETTIZERS, PaletteLayer, Palettizer

__all__ = ["PALETTIZERS", "DKMWeight", "GPTQPalettizer", "PaletteLayer", "Palettizer", "Palette", "dkm_naive", "dkm_unique", "finalize_palettized", "find_palette", "kmeans1d",
           "nearest", "palettize", "snap"]
