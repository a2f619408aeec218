"""One module per `structsim` subcommand: `configure(parser)` and `run(args) -> int`."""
