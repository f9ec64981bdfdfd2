"""benchmark: benchmark runs with a price guard and streaming measurements.

API (OpenAPI at /docs)
    POST /v1/benchmarks/run                      {provider, model, task_type, prompt, runs,
                                                 max_tokens?, concurrency?, warmup_runs?,
                                                 timeout_s?} → 202 {job_id}; 400
                                                 {"error": "benchmark_blocked", "reason"};
                                                 422 {"error": "invalid_request", "message"}
    GET  /v1/benchmarks/{job_id}                 status (queued/running/completed/failed),
                                                 per-run results, summary
    GET  /v1/benchmarks?model=&status=           jobs, newest first
    GET  /v1/benchmarks/models/{model}/summary   the latest completed job per provider and
                                                 task type

Price guard (the rule, also in `domain`): by the model's catalog price from `model.synced`,
whatever the provider. Above BENCHMARK_MAX_PRICE_PER_1M (prompt or completion, USD per 1M
tokens) → refused, naming price and cap. Variable price (`variable_price`, -1, or no price)
→ refused unless BENCHMARK_ALLOW_VARIABLE_PRICE. Not in the catalog → allowed through
`ollama` (local models are free), refused through `openrouter`/`openai` unless
BENCHMARK_ALLOW_UNKNOWN_MODELS. The worker checks again when it starts the job.

Measurements (`domain.measure`), per run, with `time.perf_counter()`:
    ttft_ms        request start → first stream chunk carrying output
    inter_token_ms gaps between chunks carrying output (per run mean/p50/p99; the job's
                   summary pools the gaps of all runs)
    tpot_ms        (e2e - ttft) / (output tokens - 1)
    e2e_ms         request start → last line of the stream
    output tokens  the server's count (Ollama `eval_count`, OpenAI `usage.completion_tokens`),
                   never the number of chunks
    tokens_per_s   output tokens / e2e; Ollama's own eval_count / eval_duration is shown too
    cost_usd       the server's reported cost (OpenRouter `usage.cost`), else the catalog
                   price times the server's token counts; a local Ollama model costs 0
Across runs: mean, p50, p90, p99. Warm-up runs go first, spread over the `concurrency`
connections the measured runs then use, and are not counted.
A run that errs or times out is recorded with its reason; a job fails only when every run
fails.

Settings: BENCHMARK_MAX_PRICE_PER_1M (10), BENCHMARK_ALLOW_VARIABLE_PRICE (0),
BENCHMARK_ALLOW_UNKNOWN_MODELS (0), BENCHMARK_MAX_ATTEMPTS (3), JOB_CLEANUP_INTERVAL (6 hours),
JOB_CLEANUP_RETENTION_DAYS (7), OLLAMA_BASE_URL (http://127.0.0.1:11434), OPENROUTER_BASE_URL
(https://openrouter.ai, as for sync: requests go to {it}/api/v1/chat/completions),
OPENROUTER_API_KEY, OPENAI_BASE_URL (https://api.openai.com/v1, as OpenAI's clients take it:
requests go to {it}/chat/completions), OPENAI_API_KEY.
"""
