"""The converter and quantizer: Hugging Face LLaVA checkpoint -> text GGUF + mmproj GGUF."""

from quantize.converter import ConvertResult, convert
from quantize.quantizer import QuantizeResult, quantize  # noqa: F401  (public API, see quantize/quantizer.py)

__all__ = ["ConvertResult", "convert"]
