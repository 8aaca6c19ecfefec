"""Export: bit-packed model files (codes + LUTs/scales in safetensors) that really are smaller."""

from .bitpack import pack_bits, packed_size, unpack_bits
from .packed import exact_uniform, load_packed, read_packed_meta, save_packed

__all__ = ["exact_uniform", "load_packed", "pack_bits", "packed_size", "read_packed_meta", "save_packed", "unpack_bits"]
