-- The catalog's prices as benchmark knows them (from model.synced), for the price guard.
CREATE TABLE model_prices (
    provider                text        NOT NULL,
    model_id                text        NOT NULL,
    name                    text        NOT NULL DEFAULT '',
    status                  text        NOT NULL,
    prompt_price_per_1m     numeric,
    completion_price_per_1m numeric,
    variable_price          boolean     NOT NULL DEFAULT false,
    synced_at               timestamptz NOT NULL,  -- occurred_at of the event applied
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model_id)
);
CREATE INDEX model_prices_model ON model_prices (model_id);

-- A benchmark job. `attempt` counts the workers that claimed it; only the worker holding
-- the current attempt may write its results and final state.
CREATE TABLE jobs (
    job_id       uuid        PRIMARY KEY,
    provider     text        NOT NULL,
    model        text        NOT NULL,
    task_type    text        NOT NULL,
    prompt       text        NOT NULL,
    runs         integer     NOT NULL,
    warmup_runs  integer     NOT NULL,
    concurrency  integer     NOT NULL,
    max_tokens   integer,
    timeout_s    double precision NOT NULL,
    status       text        NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    attempt      integer     NOT NULL DEFAULT 0,
    worker       text,
    error        text,
    summary      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);
CREATE INDEX jobs_model_created ON jobs (model, created_at DESC);
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC);
CREATE INDEX jobs_created ON jobs (created_at);

-- One measured run of one attempt of a job (warm-up runs are not stored).
CREATE TABLE job_runs (
    job_id              uuid     NOT NULL REFERENCES jobs ON DELETE CASCADE,
    attempt             integer  NOT NULL,
    run_index           integer  NOT NULL,
    ok                  boolean  NOT NULL,
    error_kind          text,
    error               text,
    ttft_ms             double precision,
    e2e_ms              double precision,
    inter_token_ms      double precision[] NOT NULL DEFAULT '{}',
    itl_mean_ms         double precision,
    itl_p50_ms          double precision,
    itl_p99_ms          double precision,
    tpot_ms             double precision,
    prompt_tokens       integer,
    output_tokens       integer,
    tokens_per_s        double precision,
    server_tokens_per_s double precision,
    cost_usd            numeric,
    cost_source         text,
    content_chunks      integer  NOT NULL DEFAULT 0,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, run_index)
);
