"""Any-precision quantization: every bit width 2..B of a weight matrix in one bitplane artifact.

* ``bitplanes``: the ``planes-v1`` layout, ``pack_planes`` / ``unpack_planes``.
* ``qtensor``: ``QuantizedTensor``, the container shared by both methods (dequantize, serialize).
* ``uniform``: nested uniform quantization with a multi-precision clipping search; ``quantize_rtn``
  baseline.
* ``nonuniform``: per-row nested k-means codebooks (after Any-Precision LLM).

The layout and formulas are documented once, in docs/bitplanes.md.
"""

from bitdial.quant.bitplanes import pack_planes, row_bytes, unpack_planes
from bitdial.quant.nonuniform import quantize_nonuniform
from bitdial.quant.qtensor import LAYOUT, QuantizedTensor
from bitdial.quant.uniform import quantize_rtn, quantize_uniform

__all__ = [
    "LAYOUT",
    "QuantizedTensor",
    "pack_planes",
    "quantize_nonuniform",
    "quantize_rtn",
    "quantize_uniform",
    "row_bytes",
    "unpack_planes",
]
