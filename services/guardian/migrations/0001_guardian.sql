-- guardian: leadership with its epoch, incidents, their restart attempts, every transition,
-- and the services held after escalation.

-- One row. A replica that takes the leader lock increments the epoch; every action checks
-- that the epoch is still its own, so a deposed leader's late action is refused.
-- `paused` is an operator's request any replica may store; the leader follows it.
CREATE TABLE leadership (
    id      boolean     PRIMARY KEY DEFAULT true CHECK (id),
    epoch   bigint      NOT NULL DEFAULT 0,
    holder  text,
    since   timestamptz,
    paused  boolean     NOT NULL DEFAULT false
);
INSERT INTO leadership DEFAULT VALUES;

CREATE TABLE incidents (
    incident_id      uuid        PRIMARY KEY,
    service          text        NOT NULL,
    opened_at        timestamptz NOT NULL,
    reason           text        NOT NULL,
    last_seen_at     timestamptz,
    closed_at        timestamptz,
    downtime_seconds double precision,
    flaps            integer     NOT NULL DEFAULT 0,
    reminders        integer     NOT NULL DEFAULT 0,
    escalated_at     timestamptz,
    report_name      text,
    report           text,
    epoch            bigint      NOT NULL
);
CREATE UNIQUE INDEX incidents_one_open ON incidents (service) WHERE closed_at IS NULL;
CREATE INDEX incidents_opened_at ON incidents (opened_at DESC);

CREATE TABLE restart_attempts (
    incident_id  uuid        NOT NULL REFERENCES incidents,
    attempt      integer     NOT NULL,
    service      text        NOT NULL,
    requested_at timestamptz NOT NULL,
    by           text        NOT NULL,  -- guardian | orchestrator
    reason       text        NOT NULL,
    outcome      text,                  -- null while in progress
    succeeded    boolean,
    finished_at  timestamptz,
    epoch        bigint      NOT NULL,
    PRIMARY KEY (incident_id, attempt)
);

CREATE TABLE transitions (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service     text        NOT NULL,
    kind        text        NOT NULL,
    at          timestamptz NOT NULL,
    incident_id uuid,
    detail      jsonb       NOT NULL DEFAULT '{}',
    epoch       bigint      NOT NULL
);
CREATE INDEX transitions_service_at ON transitions (service, at DESC);

-- Escalated services: not restarted until an operator resets them (any replica stores the
-- request in reset_requested_by, the leader carries it out and deletes the row).
CREATE TABLE held_services (
    service            text        PRIMARY KEY,
    incident_id        uuid,
    held_since         timestamptz NOT NULL,
    reset_requested_by text
);
