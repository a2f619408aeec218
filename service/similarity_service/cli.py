"""The `structsim` console script: one entry point, one module per subcommand.

Each subcommand module exposes `configure(parser)` and `run(args) -> int`. Modules are imported
only when their subcommand runs (or for `--help`), so `structsim operator` never imports torch and
`structsim --help` stays fast. A subcommand module must not import heavy dependencies at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from similarity_service import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("similarity_service.commands.serve", "run the HTTP scoring service"),
    "score": ("similarity_service.commands.score", "score sentence pairs from a file or stdin"),
    "make-checkpoint": (
        "similarity_service.commands.make_checkpoint",
        "write a synthetic StructBERT checkpoint (not semantic) for tests and benchmarks",
    ),
    "autotune": ("similarity_autotune.command", "tune batch size, max wait and precision on this device"),
    "operator": ("similarity_operator.command", "run the Kubernetes operator"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structsim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"structsim {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the subcommand name first, then let its module define the rest of its flags.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(prog=f"structsim {known.command}", description=SUBCOMMANDS[known.command][1])
    module.configure(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
