"""The workers that run benchmark jobs, and the cleanup of old jobs.

A job's life on a worker
------------------------
1. **Claim** (short transactions). `benchmark.requested` is applied in the consumer's
   transaction: the job is stored if a client published it without the API, and, when
   the worker has a free slot (`BENCHMARK_WORKER_CONCURRENCY`), claimed and handed to the
   worker's loop (`Worker.work`), which starts it: queued (or
   running under a lease that ran out) -> running, attempt + 1, this worker's id, a lease
   until now + `BENCHMARK_LEASE_S`, and on its first start a deadline of now +
   `BENCHMARK_MAX_JOB_S`. The message is acknowledged when that transaction commits; a
   worker without a free slot leaves the job queued. A scan (every
   `BENCHMARK_SCAN_INTERVAL_S`, and whenever a slot frees) claims queued jobs and jobs
   whose lease ran out (their worker died), oldest first, as many as it has free slots,
   skipping rows another worker is claiming. So replicas share the jobs, and a queued job
   waits for a free slot, never behind a slow job.
2. **Run** (no transaction open). Each claimed job runs in a task of its own. It starts
   by renewing its lease, which waits for the claim's commit (and ends the task if the
   claim rolled back). The price guard is applied again (prices change, and any client
   may publish), then the runs stream; each finished run is written for progress in a
   short transaction of its own. Every `BENCHMARK_HEARTBEAT_S` the lease is renewed,
   which also tells whether the job's cancelling was asked for.
3. **End** (one short transaction): the final state, every run, and
   `benchmark.completed`/`benchmark.failed` through the outbox, only if this attempt
   still holds the job. A cancelled job (cancelled between runs or mid-run: its streams'
   connections are closed) ends `cancelled`, one out of time `failed` with the reason,
   both with `benchmark.failed` and the runs they finished.

A worker that dies stops renewing: once the lease runs out, another worker's scan claims
the job under a new attempt and runs it from the start; the dead attempt can no longer
write. A worker that stops cleanly releases its leases at once. After
`BENCHMARK_MAX_ATTEMPTS` attempts the job fails ("gave up"). Whatever happens, a job
reaches one final state once, and its final event has an id derived from the job's.
`started_at` is when the current attempt was claimed and `finished_at` when the final
state was written, both from the database's clock at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from dataclasses import dataclass

import asyncpg
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from contracts.events import BenchmarkFailed, BenchmarkRequested
from services.benchmark import db
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import (
    CANCELLED,
    Outcome,
    Price,
    RunResult,
    Stream,
    cut_short,
    measure,
    outcome,
    refused,
    scrub,
    start_refusal,
    time_limit_reason,
)
from services.benchmark.handlers import endpoint_of, price_verdict, secrets_of
from services.benchmark.providers import Prompt, stream_runs
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime, instance_name

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

JOBS_RUNNING = Gauge("fleet_benchmark_jobs_running", "Benchmark jobs this worker runs now")
JOBS_ENDED = Counter(
    "fleet_benchmark_jobs_ended_total", "Benchmark jobs this worker ended", ["status"]
)
JOBS_TAKEN_OVER = Counter(
    "fleet_benchmark_jobs_taken_over_total", "Jobs claimed after their worker's lease ran out"
)
JOBS_DELETED = Counter(
    "fleet_benchmark_jobs_deleted_total", "Benchmark jobs deleted after the retention period"
)
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


@dataclass(frozen=True)
class Claim:
    job: BenchmarkRequested
    attempt: int
    seconds_left: float
    cancel_requested: bool

    @classmethod
    def of(cls, row: asyncpg.Record) -> Claim:
        fields = dict(row)
        attempt, seconds_left = fields.pop("attempt"), fields.pop("seconds_left")
        cancel_requested = fields.pop("cancel_requested")
        # the row was validated when it was stored; a limit tightened since must not make
        # an old job unclaimable (its claim would fail again after every lease)
        job = BenchmarkRequested.model_construct(**fields)
        return cls(job, attempt, seconds_left, cancel_requested)


Service = Runtime[BenchmarkSettings]


class Worker:
    """Runs up to `BENCHMARK_WORKER_CONCURRENCY` jobs at once. Its consumer handler claims
    jobs in the consumer's transaction and hands them to its loop, `work`, which runs them,
    claims more when slots free, and stops them when it is cancelled."""

    def __init__(self, settings: BenchmarkSettings) -> None:
        self.settings = settings
        self.worker_id = f"{instance_name()}-{uuid.uuid4().hex[:6]}"
        self.jobs: dict[uuid.UUID, asyncio.Task[None]] = {}
        # claimed by the handler, not started yet; each with the handler's context, so the
        # job's log lines carry the trace of the message that asked for it
        self._claimed: list[tuple[Claim, contextvars.Context]] = []
        self._wake = asyncio.Event()  # a claim was handed over, or a slot freed
        self._secrets = secrets_of(settings)

    def free_slots(self) -> int:
        return self.settings.benchmark_worker_concurrency - len(self.jobs) - len(self._claimed)

    # --- claiming ------------------------------------------------------------------------

    async def on_benchmark_requested(
        self, conn: Connection, events: list[BenchmarkRequested]
    ) -> None:
        """In the consumer's transaction: store the job, and claim it if there is room."""
        s = self.settings
        for event in events:
            await db.insert_job(conn, event)  # a client may publish without the API
            if self.free_slots() <= 0:
                log.info("job %s stays queued: every slot is busy", event.job_id)
                continue
            row = await db.claim_job(
                conn, event.job_id, self.worker_id, s.benchmark_lease_s, s.benchmark_max_job_s
            )
            if row is not None:
                # started by the loop; if this transaction rolls back, the job's first lease
                # renewal finds it unclaimed and the job is not run
                self._claimed.append((Claim.of(row), contextvars.copy_context()))
                self._wake.set()

    async def work(self, runtime: Service) -> None:
        """Start the jobs the handler claimed, and claim what may be claimed while there are
        free slots; on the way out, stop the running jobs and release their leases, so
        another worker takes them over at once."""
        s = self.settings
        try:
            while True:
                self._wake.clear()
                claimed, self._claimed = self._claimed, []
                for claim, context in claimed:
                    self._start(runtime, claim, context)
                if self.free_slots() > 0:
                    try:
                        async with runtime.pool.acquire() as conn:
                            rows = await db.claim_next(
                                conn,
                                self.worker_id,
                                s.benchmark_lease_s,
                                s.benchmark_max_job_s,
                                self.free_slots(),
                            )
                    except DB_ERRORS as exc:
                        log.warning("scan for jobs failed: %s", exc)
                        rows = []
                    for row in rows:
                        claim = Claim.of(row)
                        if claim.attempt > 1:
                            JOBS_TAKEN_OVER.inc()
                        self._start(runtime, claim)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), s.benchmark_scan_interval_s)
        finally:
            await self._stop_all(runtime)

    async def _stop_all(self, runtime: Service) -> None:
        self._claimed.clear()  # their leases are released below with the running ones'
        jobs = list(self.jobs.values())
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        with contextlib.suppress(*DB_ERRORS):
            async with runtime.pool.acquire() as conn:
                released = await db.release_leases(conn, self.worker_id)
            if released:
                log.info("released %d running jobs for another worker", released)

    def _start(
        self, runtime: Service, claim: Claim, context: contextvars.Context | None = None
    ) -> None:
        job_id = claim.job.job_id
        if job_id in self.jobs:  # a claim of our own job: cannot happen while we renew it
            log.warning("job %s is running here already", job_id)
            return
        task = asyncio.create_task(
            self._guarded(runtime, claim), name=f"benchmark-job-{job_id}", context=context
        )
        self.jobs[job_id] = task
        JOBS_RUNNING.set(len(self.jobs))

    async def _guarded(self, runtime: Service, claim: Claim) -> None:
        job: dict[str, str | int] = {"job_id": str(claim.job.job_id), "attempt": claim.attempt}
        try:
            # a span per attempt (in the trace of the message that asked for the job, when
            # this worker claimed it from one): its log lines and its final event carry it
            with tracer.start_as_current_span("benchmark job", attributes=job):
                await self.run_job(runtime, claim)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not take the worker down; the lease will run out
            log.exception("job %s attempt %d failed in the worker", claim.job.job_id, claim.attempt)
        finally:
            self.jobs.pop(claim.job.job_id, None)
            JOBS_RUNNING.set(len(self.jobs))
            self._wake.set()

    # --- running -------------------------------------------------------------------------

    async def run_job(self, runtime: Service, claim: Claim) -> None:
        job, attempt, s = claim.job, claim.attempt, self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + claim.seconds_left
        async with runtime.pool.acquire() as conn:
            # waits for the claim's transaction; None: it rolled back, or was taken over
            held = await db.renew_lease(conn, job.job_id, attempt, s.benchmark_lease_s, first=True)
            if held is None:
                log.info("job %s attempt %d is not held; not run", job.job_id, attempt)
                return
            verdict = await price_verdict(conn, s, job.provider, job.model)
        refusal = start_refusal(
            attempt, s.benchmark_max_attempts, verdict, claim.seconds_left, s.benchmark_max_job_s
        )
        if claim.cancel_requested:
            await self.finish(runtime, job, attempt, "cancelled", cut_short(job, CANCELLED, []), [])
            return
        if refusal is not None:
            log.warning("job %s not run: %s", job.job_id, refusal)
            await self.finish(runtime, job, attempt, "failed", refused(job, refusal), [])
            return
        log.info(
            "job %s attempt %d started: %d runs of %s via %s",
            job.job_id,
            attempt,
            job.runs,
            job.model,
            job.provider,
            extra={"worker": self.worker_id},
        )
        results: list[RunResult] = []
        runs = asyncio.create_task(self.run_all(runtime, job, attempt, verdict.price, results))
        ending = await self._watch(runtime, runs, job.job_id, attempt, deadline)
        results.sort(key=lambda r: r.run_index)
        if ending == "lost":
            log.warning(
                "job %s was taken over by another worker; results of attempt %d dropped",
                job.job_id,
                attempt,
            )
            return
        if ending == "cancelled":
            await self.finish(
                runtime, job, attempt, "cancelled", cut_short(job, CANCELLED, results), results
            )
        elif ending == "out of time":
            reason = time_limit_reason(s.benchmark_max_job_s)
            await self.finish(
                runtime, job, attempt, "failed", cut_short(job, reason, results), results
            )
        elif isinstance(ending, BaseException):
            reason = f"the worker failed: {type(ending).__name__}: {ending}"
            await self.finish(
                runtime, job, attempt, "failed", cut_short(job, reason, results), results
            )
        else:
            end = outcome(job, results)
            status = "failed" if isinstance(end, BenchmarkFailed) else "completed"
            await self.finish(runtime, job, attempt, status, end, results)

    async def _watch(
        self,
        runtime: Service,
        runs: asyncio.Task[None],
        job_id: uuid.UUID,
        attempt: int,
        deadline: float,
    ) -> str | BaseException:
        """Renew the lease while the runs go on; stop them when the job is cancelled, taken
        over or out of time. Returns how they ended: "done", "cancelled", "lost",
        "out of time", or the exception that broke them."""
        s, loop = self.settings, asyncio.get_running_loop()
        try:
            while True:
                wait = min(s.benchmark_heartbeat_s, max(0.0, deadline - loop.time()))
                await asyncio.wait({runs}, timeout=wait)
                if runs.done():
                    exc = runs.exception()
                    return "done" if exc is None else exc
                if loop.time() >= deadline:
                    ending = "out of time"
                    break
                try:
                    async with runtime.pool.acquire() as conn:
                        held = await db.renew_lease(conn, job_id, attempt, s.benchmark_lease_s)
                except DB_ERRORS as exc:  # keep running; the lease has some time left
                    log.warning("lease of job %s not renewed: %s", job_id, exc)
                    continue
                if held is None:
                    ending = "lost"
                    break
                if held:
                    ending = "cancelled"
                    break
        finally:
            if not runs.done():
                runs.cancel()  # closes the streams' connections
                with contextlib.suppress(asyncio.CancelledError):
                    await runs
        log.info("job %s attempt %d stopped: %s", job_id, attempt, ending)
        return ending

    async def run_all(
        self,
        runtime: Service,
        job: BenchmarkRequested,
        attempt: int,
        price: Price | None,
        results: list[RunResult],
    ) -> None:
        """The job's runs; each finished one goes into `results` and is recorded."""

        async def measured(index: int, stream: Stream) -> None:
            result = measure(index, stream, price)
            if result.error is not None:
                result.error = scrub(result.error, self._secrets)
                log.info("job %s run %d failed: %s", job.job_id, index, result.error)
            results.append(result)
            await self.record(runtime, job.job_id, attempt, result)

        await stream_runs(
            endpoint_of(self.settings, job.provider),
            [Prompt(job.model, job.task_type, job.prompt, job.max_tokens)] * job.runs,
            concurrency=job.concurrency,
            warmup_runs=job.warmup_runs,
            timeout_s=job.timeout_s,
            on_stream=measured,
        )

    async def record(
        self, runtime: Service, job_id: uuid.UUID, attempt: int, result: RunResult
    ) -> None:
        """Progress only: the final transaction writes every run again, so a failure here
        loses nothing."""
        try:
            async with runtime.pool.acquire() as conn:
                await db.add_run(conn, job_id, attempt, result)
        except DB_ERRORS as exc:
            log.warning("progress of job %s not recorded: %s", job_id, exc)

    # --- ending --------------------------------------------------------------------------

    async def finish(
        self,
        runtime: Service,
        job: BenchmarkRequested,
        attempt: int,
        status: str,
        end: Outcome,
        results: list[RunResult],
    ) -> None:
        """Write the final state and its event in one short transaction, if this attempt
        still holds the job; retried a few times while the database is unavailable (after
        that the lease runs out and another worker runs the job again)."""
        error = end.error if isinstance(end, BenchmarkFailed) else None
        for delay in (0.2, 0.5, 1.0, 2.0, 4.0, None):
            try:
                async with runtime.transaction() as conn:
                    done = await db.finish_job(
                        conn, job.job_id, attempt, status, end.summary, error, results
                    )
                    if done:
                        await outbox.add(conn, [end])
                break
            except DB_ERRORS as exc:
                if delay is None:
                    log.error("job %s: final state not written: %s", job.job_id, exc)
                    return
                log.warning("job %s: final state not written yet: %s", job.job_id, exc)
                await asyncio.sleep(delay)
        if done:
            JOBS_ENDED.labels(status).inc()
            ok = sum(r.ok for r in results)
            log.info(
                "job %s attempt %d ended %s: %d of %d runs ok%s",
                job.job_id,
                attempt,
                status,
                ok,
                job.runs,
                f" ({error})" if error else "",
                extra={"job_id": str(job.job_id), "status": status, "worker": self.worker_id},
            )
        else:
            log.warning(
                "job %s: attempt %d no longer holds it; not ended here", job.job_id, attempt
            )


async def cleanup_jobs(runtime: Service) -> None:
    """At start, then every JOB_CLEANUP_INTERVAL hours."""
    settings = runtime.settings
    while True:
        async with runtime.pool.acquire() as conn:
            deleted = await db.delete_jobs_created_before(conn, settings.job_cleanup_retention_days)
        JOBS_DELETED.inc(deleted)
        log.info(
            "job cleanup: deleted %d jobs older than %g days",
            deleted,
            settings.job_cleanup_retention_days,
            extra={"deleted": deleted},
        )
        await asyncio.sleep(settings.job_cleanup_interval * 3600)
