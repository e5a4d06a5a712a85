"""mono_quant: model-agnostic PyTorch quantization."""

__version__ = "0.1.0"
