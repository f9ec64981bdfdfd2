-- Each model's work record per user and session ("the model's labour book").
CREATE TABLE model_statistics (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id           text        NOT NULL,
    model_id          text        NOT NULL,
    session_id        text        NOT NULL,
    response_count    integer     NOT NULL DEFAULT 0,
    total_brains      integer     NOT NULL DEFAULT 0,
    dismissal_count   integer     NOT NULL DEFAULT 0,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_usd          numeric(20, 10) NOT NULL DEFAULT 0,
    first_used_at     timestamptz,
    last_used_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, model_id, session_id)
);
CREATE INDEX model_statistics_user ON model_statistics (user_id);
CREATE INDEX model_statistics_model ON model_statistics (model_id);
