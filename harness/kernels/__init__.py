"""Real low-bit execution: packed weight formats, integer GEMMs and the conversion of fake-quant models."""
