"""Bit packing of ``b``-bit codes (``b`` = 1-8) into bytes, vectorised (numpy), no per-element loops.

Layout: code ``i`` occupies stream bits ``[i·b, (i+1)·b)``, least significant bit first, and stream
bit ``j`` is bit ``j mod 8`` of byte ``j // 8`` (little-endian bit order). The last byte is
zero-padded. ``N`` codes take ``ceil(N·b / 8)`` bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import check_int
from ..quant.spec import WEIGHT_BITS, check_bits


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, flattened; each ``< 2^bits``) into uint8 ``[ceil(N·bits/8)]``."""
    check_bits(bits, "bits", WEIGHT_BITS)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor; got {getattr(codes, 'dtype', type(codes).__name__)}")
    flat = codes.detach().reshape(-1).cpu().numpy()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2^bits = {1 << bits}; found {int(flat.max())}")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (uint8 ``[n]``)."""
    check_bits(bits, "bits", WEIGHT_BITS)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError("packed must be a 1-D uint8 tensor")
    check_int("n", n, minimum=0)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_size(n, bits)} bytes; got {packed.numel()}")
    data = packed.cpu().numpy()
    if bits == 8:
        return torch.from_numpy(data.copy())
    planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return torch.from_numpy((planes * weights).sum(axis=1, dtype=np.uint8))
