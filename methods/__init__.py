"""Quantization method plugins for qvlm-harness, each registered in `qvlm_harness.plugins`."""
