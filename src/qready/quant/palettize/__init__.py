"""Palettization back-end: weights onto a small LUT (k-means, DKM, learnable representatives)."""

from .apply import finalize_palettized, palettize
from .codebook import Palette, find_palette, nearest, snap
from .dkm import DKMWeight, dkm_naive, dkm_unique
from .kmeans import kmeans1d

__all__ = ["DKMWeight", "Palette", "dkm_naive", "dkm_unique", "finalize_palettized", "find_palette", "kmeans1d",
           "nearest", "palettize", "snap"]
