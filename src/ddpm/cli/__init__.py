"""The ``ddpm`` command line: a thin shell over the library, one module per command.

Each command module registers its flags and calls the library (:func:`ddpm.fit`, :func:`ddpm.load`,
:mod:`ddpm.evaluate`, :mod:`ddpm.demo`); shared flag groups live in :mod:`ddpm.cli.common`.
Exit statuses: 0 done; 1 a run stopped by non-finite losses; 2 a user error
(:class:`ddpm.errors.UserError`, printed as ``ddpm <command>: error: ...``); 75 a training run
stopped early by SIGTERM, SIGUSR1, SIGINT or ``--time-limit`` after writing a checkpoint of the
step it reached (rerun with ``--resume auto``); 130 interrupted outside training; 128 + N a stop
whose grace period ran out (the last checkpoint before it stays). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ddpm.cli import (
    demo,
    edit,
    eval,
    export,
    forward,
    inpaint,
    interpolate,
    nll,
    prepare,
    runs,
    sample,
    stats,
    sweep,
    train,
)
from ddpm.cli.common import HelpFormatter

COMMANDS = (train, prepare, runs, sample, inpaint, edit, interpolate, nll, forward, eval, stats, sweep, demo, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", formatter_class=HelpFormatter,
                                     description="Denoising Diffusion Probabilistic Models: train, sample, measure.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ddpm.errors import NonFiniteLossError, UserError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:
        print(f"ddpm {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        if args.verbose:
            raise
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
