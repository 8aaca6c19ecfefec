"""Export: bit-packed model files (codes + LUTs/scales in safetensors) that really are smaller, ONNX
with QuantizeLinear/DequantizeLinear or MatMulNBits, and Core ML packages with LUT / quantized weights
(``onnx`` and ``coremltools`` are imported only when exporting)."""

from .bitpack import pack_bits, packed_size, unpack_bits
from .coreml import export_coreml
from .onnx import export_onnx, weight_encodings
from .packed import exact_uniform, load_packed, read_packed_meta, save_packed

__all__ = ["exact_uniform", "export_coreml", "export_onnx", "load_packed", "pack_bits", "packed_size",
           "read_packed_meta", "save_packed", "unpack_bits", "weight_encodings"]
