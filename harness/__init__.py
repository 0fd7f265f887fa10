"""qvlm-harness: benchmark post-training quantization methods on vision-language models."""

__version__ = "0.1.0"
