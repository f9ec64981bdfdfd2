"""python -m services.demo {seed,run,reset} [--minutes N] [--json PATH]"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.demo.demo import main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet demo",
        description="Demo data and live traffic through a running `fleet up` (public APIs "
        "and NATS subjects only). seed: demo users and their tokens, the catalog and device "
        "of the demo's fake servers, a first plan per agent; run: seed, then plans, failures, "
        "approvals, brains, benchmarks, a price change and a device outage; reset: cancel "
        "what a run left unfinished, restore the catalog, seed again.",
    )
    parser.add_argument("command", choices=["seed", "run", "reset"])
    parser.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="run: keep traffic coming until this many minutes have passed (default 2; "
        "0: the scripted story only)",
    )
    parser.add_argument("--json", type=Path, help="also write what happened to this file")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main(args.command, max(args.minutes, 0.0), args.json))
    except RuntimeError as exc:  # not running, not ready, a port taken
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
