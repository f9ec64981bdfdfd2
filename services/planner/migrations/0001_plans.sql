-- Execution plans and their subtasks (the seed's poc_execution_plans and
-- poc_subtask_executions), approval requests, and models dismissed from sessions.

CREATE TABLE execution_plans (
    plan_id            text        PRIMARY KEY,
    task_execution_id  text        NOT NULL UNIQUE,  -- the task id: one plan per task
    user_id            text        NOT NULL,
    session_id         text        NOT NULL,
    original_task      text        NOT NULL,
    subtask_count      integer     NOT NULL DEFAULT 0,
    status             text        NOT NULL CHECK (status IN
                           ('awaiting_approval', 'running', 'completed', 'failed', 'cancelled')),
    requires_approval  boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    is_complete        boolean     NOT NULL DEFAULT false,
    metadata           jsonb       NOT NULL DEFAULT '{}',
    fingerprint        text        NOT NULL,  -- of the request: a repeated POST is recognised
    metrics            jsonb                  -- as sent in plan.completed
);
CREATE INDEX execution_plans_status ON execution_plans (status, created_at DESC);
CREATE INDEX execution_plans_open_session ON execution_plans (user_id, session_id)
    WHERE NOT is_complete;

CREATE TABLE subtask_executions (
    plan_id            text        NOT NULL REFERENCES execution_plans ON DELETE CASCADE,
    subtask_id         text        NOT NULL,
    sequence_number    integer     NOT NULL,
    description        text        NOT NULL,
    agent              text        NOT NULL,
    estimated_time     text,
    status             text        NOT NULL DEFAULT 'pending' CHECK (status IN
                           ('pending', 'awaiting_approval', 'held', 'ready', 'running',
                            'retrying', 'completed', 'failed', 'rejected', 'skipped',
                            'cancelled')),
    started_at         timestamptz,
    completed_at       timestamptz,
    duration_seconds   double precision,
    result             text,
    error              text,
    dependencies       jsonb       NOT NULL DEFAULT '[]',
    attempt            integer     NOT NULL DEFAULT 0,  -- attempts dispatched so far
    max_attempts       integer     NOT NULL CHECK (max_attempts >= 1),
    timeout_s          double precision NOT NULL CHECK (timeout_s > 0),
    requires_approval  boolean     NOT NULL DEFAULT false,
    next_attempt_at    timestamptz,  -- while retrying
    deadline_at        timestamptz,  -- while ready or running
    ready_at           timestamptz,  -- when the current attempt was dispatched
    PRIMARY KEY (plan_id, subtask_id)
);
CREATE INDEX subtask_executions_plan_seq ON subtask_executions (plan_id, sequence_number);
-- the timer loop's queries, kept tiny by covering only what can come due
CREATE INDEX subtask_executions_deadline ON subtask_executions (deadline_at)
    WHERE status IN ('ready', 'running');
CREATE INDEX subtask_executions_retry ON subtask_executions (next_attempt_at)
    WHERE status = 'retrying';
-- "is anything of this plan still open?" after each change
CREATE INDEX subtask_executions_open ON subtask_executions (plan_id)
    WHERE status NOT IN ('completed', 'failed', 'rejected', 'skipped', 'cancelled');

-- The dependency edges, for "who depends on what just completed" without reading the plan.
CREATE TABLE subtask_dependencies (
    plan_id     text NOT NULL REFERENCES execution_plans ON DELETE CASCADE,
    depends_on  text NOT NULL,
    subtask_id  text NOT NULL,
    PRIMARY KEY (plan_id, depends_on, subtask_id)
);
CREATE INDEX subtask_dependencies_subtask ON subtask_dependencies (plan_id, subtask_id);

CREATE TABLE approval_requests (
    id           uuid        PRIMARY KEY,
    user_id      text        NOT NULL,
    session_id   text,
    plan_id      text        NOT NULL REFERENCES execution_plans ON DELETE CASCADE,
    subtask_id   text,  -- null for an approval of the whole plan
    type         text        NOT NULL CHECK (type IN ('tool', 'plan')),
    payload      jsonb       NOT NULL DEFAULT '{}',
    status       text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'approved', 'rejected', 'timeout')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    resolved_at  timestamptz,
    decision     text
);
CREATE INDEX approval_requests_expiry ON approval_requests (expires_at) WHERE status = 'pending';
CREATE INDEX approval_requests_status ON approval_requests (status, created_at);
CREATE INDEX approval_requests_plan ON approval_requests (plan_id);

CREATE TABLE dismissed_models (
    user_id       text        NOT NULL,
    session_id    text        NOT NULL,
    model_id      text        NOT NULL,
    reason        text,
    dismissed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, session_id, model_id)
);
