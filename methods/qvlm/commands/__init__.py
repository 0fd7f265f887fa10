"""Q-VLM's own `harness` subcommands, declared as entry points of the group ``qvlm_harness.commands`` in
pyproject.toml (the engine CLI knows no method): `analyze dependency` measures the paper's entropy vs cross-layer
dependency relation with Q-VLM's units, entropies and searches."""
