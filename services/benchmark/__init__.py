"""benchmark: benchmark runs with a price guard and streaming measurements.

API (OpenAPI at /docs; every route takes a bearer token: a user acts on the jobs they
submitted, an operator on all; errors in the chassis' one shape)
    POST /v1/benchmarks/run             {provider, model, task_type, prompt, runs,
                                        max_tokens?, concurrency?, warmup_runs?, timeout_s?}
                                        -> 202 {job_id}; 400 benchmark_blocked (the price
                                        guard, `domain.PRICE_GUARD_RULE`); 429 quota_exceeded
                                        with Retry-After
    POST /v1/benchmarks/{job_id}/cancel 200 cancelled (was queued) / 202 running (its worker
                                        stops it) / 404 / 409 job_finished
    GET  /v1/benchmarks/{job_id}        status (queued/running/completed/failed/cancelled),
                                        per-run results, summary
    GET  /v1/benchmarks?model=&status=  the caller's jobs, newest first
    GET  /v1/benchmarks/models/{model}/summary   the latest completed job per provider and
                                        task type

Where things are: the price guard and every measurement's definition in `domain`; the
clocks of a run (when each starts and stops) and the wire formats in `providers`; how a
job is claimed, run outside any transaction, renewed, cancelled, bounded in time, taken
over and ended once in `worker`; every setting with its meaning in `config`.
"""
