-- guardian's smoke canary: each run through the pipeline, its steps and their times.
-- The status page and GET /api/guardian/smoke read the newest; a failed run opens an
-- incident of the pseudo-service `smoke` (in incidents, like a crash).
CREATE TABLE smoke_runs (
    run_id      uuid        PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    trigger     text        NOT NULL,  -- schedule | operator
    requested_by text,
    instance    text        NOT NULL,
    ok          boolean     NOT NULL,
    seconds     double precision NOT NULL,
    steps       jsonb       NOT NULL   -- [{step, service, ok, seconds, detail}]
);
CREATE INDEX smoke_runs_started_at ON smoke_runs (started_at DESC);
