"""`python -m qvlm_harness ...` is the same as the `harness` console script."""

from qvlm_harness.cli import main

raise SystemExit(main())
