"""Post-training quantization: GPTQ and RTN per linear module and per expert slice (gptq.py), bit packing
(packing.py), bit plans with allocation heuristics and scorers (plans.py, predictor.py), the `quant` patch kind
with its dequantize-on-the-fly linear (kind.py), the driver (quantize.py) and the GPTQ checkpoint export
(export.py)."""

from patchlm.quant.config import BITS, KEEP, QuantConfig
from patchlm.quant.gptq import Quantized, dequantize, gptq, rtn
from patchlm.quant.kind import QuantKind, QuantLinear, is_quantized
from patchlm.quant.packing import pack, unpack
from patchlm.quant.quantize import quantize_model

__all__ = ["BITS", "KEEP", "QuantConfig", "QuantKind", "QuantLinear", "Quantized", "dequantize", "gptq",
           "is_quantized", "pack", "quantize_model", "rtn", "unpack"]
