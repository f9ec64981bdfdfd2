"""Time from `fleet up` (installed) to all five services ready.

    python -m benchmarks.startup [--rounds 3]

Cold: a new FLEET_HOME (initdb, first migrations). Warm: the same home again (data kept).
Measured from process start to `stack.json` written, which `fleet up` does once every
service answers /health/ready.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_once(home: Path) -> float:
    env = {**os.environ, "FLEET_HOME": str(home)}
    env.pop("NATS_URL", None)
    env.pop("DATABASE_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (home / "stack.json").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"fleet up exited with {proc.returncode}; see {home}/logs")
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    for r in range(1, args.rounds + 1):
        home = Path(tempfile.mkdtemp(prefix="fleet-startup-")) / "fleet"
        cold.append(start_once(home))
        warm.append(start_once(home))
        print(f"round {r}: cold {cold[-1]:.2f}s  warm {warm[-1]:.2f}s", flush=True)
        shutil.rmtree(home.parent, ignore_errors=True)
    print(
        f"\n{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"fleet up -> five services ready: cold median {statistics.median(cold):.2f}s, "
        f"warm median {statistics.median(warm):.2f}s (target <= 10 s)"
    )


if __name__ == "__main__":
    main()
