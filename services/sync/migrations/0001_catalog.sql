-- The model catalog: OpenRouter's kept models and the models of local Ollama devices.
CREATE TABLE models (
    provider                text        NOT NULL,
    device                  text,                   -- the Ollama device; NULL for OpenRouter
    model_id                text        NOT NULL,
    name                    text        NOT NULL,
    context_length          integer,
    prompt_price_per_1m     numeric,                -- USD; NULL when the price is variable
    completion_price_per_1m numeric,
    variable_price          boolean     NOT NULL DEFAULT false,
    status                  text        NOT NULL
        CHECK (status IN ('active', 'removed', 'unavailable')),
    first_seen_at           timestamptz NOT NULL DEFAULT now(),
    -- Set when the row is written. An unchanged model is not rewritten on every sync (that is
    -- what keeps an unchanged catalog free), so for an active model the API reports the later
    -- of this and its source's last successful check.
    last_seen_at            timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    raw                     jsonb       NOT NULL,   -- the entry as the source sent it
    UNIQUE NULLS NOT DISTINCT (provider, device, model_id)
);
CREATE INDEX models_model_id ON models (model_id);

-- One row whenever a model's price is first seen or changes.
CREATE TABLE price_history (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider                text        NOT NULL,
    device                  text,
    model_id                text        NOT NULL,
    prompt_price_per_1m     numeric,
    completion_price_per_1m numeric,
    variable_price          boolean     NOT NULL,
    recorded_at             timestamptz NOT NULL DEFAULT now(),
    run_id                  uuid
);
CREATE INDEX price_history_model ON price_history (provider, model_id, recorded_at);

-- OpenRouter catalog runs.
CREATE TABLE sync_runs (
    id           uuid        PRIMARY KEY,
    trigger      text        NOT NULL,            -- startup, schedule, api
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    status       text        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'succeeded', 'not_modified', 'failed')),
    fetched      integer     NOT NULL DEFAULT 0,
    filtered     integer     NOT NULL DEFAULT 0,
    selected     integer     NOT NULL DEFAULT 0,
    added        integer     NOT NULL DEFAULT 0,
    changed      integer     NOT NULL DEFAULT 0,
    removed      integer     NOT NULL DEFAULT 0,
    skipped      integer     NOT NULL DEFAULT 0,  -- entries that could not be read
    error        text,
    etag         text,                            -- of the response this run applied
    selection    text                             -- the rules it applied (price cap, top N, rank)
);
CREATE INDEX sync_runs_started_at ON sync_runs (started_at DESC);
CREATE INDEX sync_runs_finished_ok ON sync_runs (finished_at)
    WHERE status IN ('succeeded', 'not_modified');

-- Local Ollama devices as last checked.
CREATE TABLE devices (
    name            text        PRIMARY KEY,
    base_url        text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('online', 'offline')),
    version         text,
    model_count     integer,
    last_error      text,
    status_since    timestamptz NOT NULL DEFAULT now(),
    last_checked_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz                         -- last answer
);
