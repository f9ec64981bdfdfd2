"""The `fleet demo` command line (also `python -m services.demo`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

DESCRIPTION = """\
Demo data and live traffic through a running `fleet up`, through its public APIs and NATS
subjects only (start the stack with `fleet up --demo` so that sync and benchmark use the
demo's own catalog, device and model server).

  seed   demo users and their tokens, the demo's catalog and device in sync, a first plan
         for each of the three agents
  run    seed, then plans with retries, failures and approvals, brains and dismissals,
         benchmarks, a catalog price change and a device outage; more plans until
         --minutes have passed (Ctrl-C: finish and sum up)
  reset  cancel what a run left unfinished, restore the catalog's prices, seed again
"""

HINT = (
    "\ntry it: .venv/bin/fleet demo run   (plans, agents, approvals, benchmarks, a price "
    "change, a device outage; fleet demo --help)"
)


def stack_env(demo: bool) -> dict[str, str]:
    """What `fleet up --demo` adds to the services' environment (variables set win)."""
    if not demo:
        return {}
    from services.demo.servers import stack_env

    return stack_env()


def arguments(parser: argparse.ArgumentParser) -> None:
    """`fleet demo`'s arguments on `parser`, which then runs `command`."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("command", choices=["seed", "run", "reset"])
    parser.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="run: keep traffic coming until this many minutes have passed (default 2; "
        "0: the scripted story only, about half a minute)",
    )
    parser.add_argument("--json", type=Path, help="also write what the demo did to this file")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from services.demo.demo import main  # the demo's dependencies only when it runs

    try:
        return asyncio.run(main(args.command, max(args.minutes, 0.0), args.json))
    except (RuntimeError, ValueError) as exc:  # not running, not ready, a port taken or bad
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet demo")
    arguments(parser)
    return command(parser.parse_args(argv))
