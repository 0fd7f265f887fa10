"""One module per `harness` subcommand. Each defines `add_parser(subparsers)` and `execute(args) -> int`.

Adding a subcommand = a new module here + one line in `qvlm_harness.cli.SUBCOMMANDS`.
"""
