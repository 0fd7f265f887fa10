"""Quantization method plugins for qvlm-harness, each registered in `harness.plugins`."""
