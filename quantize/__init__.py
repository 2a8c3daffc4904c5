"""The converter and quantizer: Hugging Face LLaVA checkpoint -> text GGUF + mmproj GGUF."""

from quantize.converter import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
