-- A worker holds a running job by a lease it renews while it runs; a job whose lease ran
-- out (its worker died) is taken over by another. Who submitted a job (for quotas and
-- cancelling), when its time is up, and whether its cancelling was asked for.
ALTER TABLE jobs
    ADD COLUMN user_id             text,
    ADD COLUMN lease_expires_at    timestamptz,
    ADD COLUMN deadline_at         timestamptz,
    ADD COLUMN cancel_requested_at timestamptz,
    DROP CONSTRAINT jobs_status_check,
    ADD CONSTRAINT jobs_status_check
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled'));

-- the jobs a worker may take: queued ones, and running ones whose lease ran out
CREATE INDEX jobs_claimable ON jobs (lease_expires_at NULLS FIRST, created_at)
    WHERE status IN ('queued', 'running');
-- a user's queued and running jobs, for the quota
CREATE INDEX jobs_active_by_user ON jobs (user_id) WHERE status IN ('queued', 'running');

ALTER TABLE job_runs
    ADD COLUMN ttfb_ms          double precision,
    ADD COLUMN itl_per_token_ms double precision[] NOT NULL DEFAULT '{}';
