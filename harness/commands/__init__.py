"""One module per built-in `harness` subcommand. Each defines `add_parser(subparsers)` and `execute(args) -> int`.

Adding a built-in = a new module here + one line in `qvlm_harness.cli.SUBCOMMANDS`. A method's or third party's
own subcommand is an entry point of the group ``qvlm_harness.commands`` instead (see `qvlm_harness.cli`).
"""
