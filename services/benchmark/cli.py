"""`fleet bench`: run a benchmark from the command line.

fleet bench run --provider ollama --model llama3.1:8b --runs 5 [--url URL]
    submits a job, shows its progress and prints a table of the results
fleet bench show JOB_ID [--url URL]
    prints the results of a job

URL defaults to $BENCHMARK_URL, else the benchmark service of a running `fleet up`, else
http://127.0.0.1:8102. The bearer token is --token, else $FLEET_TOKEN, else a development
token of --user (default $USER) signed with AUTH_JWT_SECRET or the development secret of
FLEET_HOME, as `fleet token` makes it. Exit status: 0 when the job completed, 1 when it failed, was
refused or the service could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8102"
DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
FINISHED = ("completed", "failed", "cancelled")


def default_url() -> str:
    if os.environ.get("BENCHMARK_URL"):
        return os.environ["BENCHMARK_URL"]
    from services.stack import fleet_home, read_state

    state = read_state(fleet_home())
    services = state.get("services") if state else None
    url = services.get("benchmark") if isinstance(services, dict) else None
    return url if isinstance(url, str) else DEFAULT_URL


def token_of(args: argparse.Namespace) -> str:
    if args.token or os.environ.get("FLEET_TOKEN"):
        return str(args.token or os.environ["FLEET_TOKEN"])
    from services.runtime.auth import development_secret, mint

    secret = os.environ.get("AUTH_JWT_SECRET") or development_secret()
    return mint(secret, args.user or os.environ.get("USER") or "me", "user")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="submit a job, follow it, print the results")
    run.add_argument("--provider", required=True, choices=["ollama", "openrouter", "openai"])
    run.add_argument("--model", required=True)
    run.add_argument("--runs", type=int, default=3, help="measured runs (default 3)")
    run.add_argument("--task-type", default="generate", choices=["generate", "chat"])
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--concurrency", type=int, default=1)
    run.add_argument("--warmup-runs", type=int, default=0)
    run.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    run.add_argument("--url", help="the benchmark service")
    run.add_argument("--token", help="bearer token (default: see above)")
    run.add_argument("--user", help="whose development token (default: $USER)")
    run.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    show = sub.add_parser("show", help="print the results of a job")
    show.add_argument("job_id")
    show.add_argument("--url", help="the benchmark service")
    show.add_argument("--token", help="bearer token (default: see above)")
    show.add_argument("--user", help="whose development token (default: $USER)")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    out = out or sys.stdout
    url = (args.url or default_url()).rstrip("/")
    try:
        headers = {"Authorization": f"Bearer {token_of(args)}"}
        with httpx.Client(base_url=url, timeout=10, headers=headers) as client:
            if args.command == "show":
                return show(client, args.job_id, out)
            return submit_and_follow(client, args, out)
    except httpx.HTTPError as exc:
        print(f"cannot reach the benchmark service at {url}: {exc}", file=out)
        return 1


def submit_and_follow(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {
        "provider": args.provider,
        "model": args.model,
        "task_type": args.task_type,
        "prompt": args.prompt,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "warmup_runs": args.warmup_runs,
        "timeout_s": args.timeout,
    }
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    r = client.post("/v1/benchmarks/run", json=body)
    if r.status_code in (400, 422, 429):
        error = r.json().get("error") or {}
        what = {400: "refused", 422: "invalid request", 429: "over quota"}[r.status_code]
        print(f"{what}: {error.get('message')}", file=out)
        return 1
    r.raise_for_status()
    job_id = r.json()["job_id"]
    print(f"job {job_id}: {args.runs} runs of {args.model} via {args.provider}", file=out)
    job = follow(client, job_id, args.poll, out)
    print(results_table(job), file=out)
    return 0 if job["status"] == "completed" else 1


def follow(client: httpx.Client, job_id: str, poll: float, out: TextIO) -> dict[str, Any]:
    """Poll until the job is finished, printing each change of its progress."""
    live = out.isatty()
    last = ""
    while True:
        r = client.get(f"/v1/benchmarks/{job_id}")
        r.raise_for_status()
        job: dict[str, Any] = r.json()
        line = progress_line(job)
        if line != last:
            print(
                ("\r" + line.ljust(len(last))) if live else line, end="" if live else "\n", file=out
            )
            out.flush()
            last = line
        if job["status"] in FINISHED:
            if live:
                print(file=out)
            return job
        time.sleep(poll)


def progress_line(job: dict[str, Any]) -> str:
    if job["status"] == "queued":
        return "queued, waiting for a worker"
    line = f"{job['status']}: {job['runs_done']}/{job['runs']} runs done"
    if job["runs_failed"]:
        line += f", {job['runs_failed']} failed"
    if job["attempt"] > 1:
        line += f" (attempt {job['attempt']})"
    return line


def show(client: httpx.Client, job_id: str, out: TextIO) -> int:
    r = client.get(f"/v1/benchmarks/{job_id}")
    if r.status_code == 404:
        print(f"no benchmark job {job_id}", file=out)
        return 1
    r.raise_for_status()
    job = r.json()
    print(results_table(job), file=out)
    return 0 if job["status"] == "completed" else 1


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(job: dict[str, Any]) -> str:
    """Per-run results, then the distribution across runs."""
    parts = [f"\n{job['model']} via {job['provider']} ({job['task_type']}): {job['status']}"]
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    runs = [
        (
            "run",
            "ttft ms",
            "itl p50 ms",
            "itl p99 ms",
            "tpot ms",
            "e2e ms",
            "tokens",
            "tok/s",
            "cost $",
        )
    ]
    failures = []
    for r in job.get("results", []):
        if not r["ok"]:
            failures.append(f"  run {r['run_index'] + 1}: {r['error_kind']}: {r['error']}")
            continue
        runs.append(
            (
                str(r["run_index"] + 1),
                _num(r["ttft_ms"]),
                _num(r["itl_p50_ms"]),
                _num(r["itl_p99_ms"]),
                _num(r["tpot_ms"]),
                _num(r["e2e_ms"]),
                "-" if r["output_tokens"] is None else str(r["output_tokens"]),
                _num(r["tokens_per_s"]),
                _num(r["cost_usd"], 6),
            )
        )
    if len(runs) > 1:
        parts += ["", table(runs)]
    if failures:
        parts += ["", "failed runs:", *failures]
    summary = job.get("summary")
    if summary:
        agg = [("", "mean", "p50", "p90", "p99")]
        for key, label in (
            ("ttft_ms", "ttft ms"),
            ("inter_token_ms", "itl/chunk ms"),
            ("itl_per_token_ms", "itl/token ms"),
            ("tpot_ms", "tpot ms"),
            ("e2e_ms", "e2e ms"),
            ("tokens_per_s", "tokens/s"),
        ):
            d = summary.get(key)
            if d:
                agg.append((label, _num(d["mean"]), _num(d["p50"]), _num(d["p90"]), _num(d["p99"])))
        if len(agg) > 1:
            parts += ["", table(agg)]
        cost = summary.get("cost_usd")
        parts.append(
            f"\nruns: {summary['runs_ok']} ok, {summary['runs_failed']} failed; "
            f"output tokens: {summary['output_tokens']}; "
            f"cost: {'unknown' if cost is None else '$' + _num(cost, 6)}"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
