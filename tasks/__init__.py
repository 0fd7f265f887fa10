"""Task plugins (benchmarks) for qvlm-harness, each registered in `qvlm_harness.plugins`."""
