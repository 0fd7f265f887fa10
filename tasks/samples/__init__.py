"""Embedded sample sets in the official formats of ScienceQA, VQAv2, VizWiz and Hateful Memes.

They are derived from easy-VQA's synthetic scenes and from real photographs shipped in PyPI packages, so the
harness runs its real loaders and metrics offline. They are not the official benchmarks. `python -m
tasks.samples.build` regenerates them deterministically (see that module for how each set is made).
"""
