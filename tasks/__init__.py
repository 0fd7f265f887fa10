"""Task plugins (benchmarks) for qvlm-harness, each registered in `harness.plugins`."""
