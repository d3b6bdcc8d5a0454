"""hago: hardware-aware post-training quantization on Apache TVM Relax."""

__version__ = "0.1.0"
