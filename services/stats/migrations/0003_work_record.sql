-- The whole work record: dismissals and brains, the session roster, the cost of every call,
-- and the aggregates the read paths are served from (so reads never scan raw events).

-- Sums of events outgrow integer long before a user notices.
ALTER TABLE model_statistics
    ALTER COLUMN response_count  TYPE bigint,
    ALTER COLUMN total_brains    TYPE bigint,
    ALTER COLUMN dismissal_count TYPE bigint,
    ALTER COLUMN cost_usd        TYPE numeric(30, 12),
    -- the session roster (seed 003 part 1): a row is a model on the session's panel, from
    -- the first event that names it there; dismissed when any dismissal was applied, so a
    -- dismissed model stays dismissed whatever order the events arrive in
    ADD COLUMN appeared_at      timestamptz,
    ADD COLUMN dismissed_at     timestamptz,
    ADD COLUMN dismissal_reason text,
    -- calls whose cost is not known (variable or unknown price): never counted as 0
    ADD COLUMN unpriced_calls   bigint NOT NULL DEFAULT 0;
UPDATE model_statistics SET appeared_at = coalesce(first_used_at, created_at);
ALTER TABLE model_statistics ALTER COLUMN appeared_at SET NOT NULL;
CREATE INDEX model_statistics_user_session ON model_statistics (user_id, session_id);

-- The price table, with history, from model.synced: a call is priced at the price in force
-- when it happened. Catalog data, no user's rows: not readable by stats_user at all.
CREATE TABLE model_prices (
    model_id                text        NOT NULL,
    valid_from              timestamptz NOT NULL,
    event_id                uuid        NOT NULL,
    prompt_price_per_1m     numeric,
    completion_price_per_1m numeric,
    variable_price          boolean     NOT NULL,
    price_tiers             jsonb       NOT NULL DEFAULT '[]',
    PRIMARY KEY (model_id, valid_from, event_id)
);

-- llm_costs (seed 000): every call stats counted, with the unit prices used and where they
-- came from. cost_usd is null exactly when the price is unknown, and then a reason says why.
CREATE TABLE llm_costs (
    event_id                uuid        PRIMARY KEY,
    user_id                 text        NOT NULL,
    model_id                text        NOT NULL,
    session_id              text        NOT NULL,
    called_at               timestamptz NOT NULL,
    prompt_tokens           bigint      NOT NULL,
    completion_tokens       bigint      NOT NULL,
    prompt_price_per_1m     numeric,
    completion_price_per_1m numeric,
    cost_usd                numeric(30, 12),
    price_source            text        NOT NULL
        CHECK (price_source IN ('event', 'catalog', 'unknown')),
    unknown_reason          text,
    CHECK ((price_source = 'unknown') = (cost_usd IS NULL)),
    CHECK ((price_source = 'unknown') = (unknown_reason IS NOT NULL))
);
CREATE INDEX llm_costs_user_called ON llm_costs (user_id, called_at DESC, event_id DESC);

-- Incremental aggregates, one row per key, added to by the consumers in the same
-- transaction as the events (read paths sum a handful of rows, never the history).
-- sessions_appeared: (model, session) pairs first seen; sessions_dismissed: first dismissed.
CREATE TABLE user_model_totals (
    user_id            text    NOT NULL,
    model_id           text    NOT NULL,
    response_count     bigint  NOT NULL DEFAULT 0,
    total_brains       bigint  NOT NULL DEFAULT 0,
    dismissal_count    bigint  NOT NULL DEFAULT 0,
    sessions_appeared  bigint  NOT NULL DEFAULT 0,
    sessions_dismissed bigint  NOT NULL DEFAULT 0,
    prompt_tokens      bigint  NOT NULL DEFAULT 0,
    completion_tokens  bigint  NOT NULL DEFAULT 0,
    cost_usd           numeric(30, 12) NOT NULL DEFAULT 0,
    unpriced_calls     bigint  NOT NULL DEFAULT 0,
    first_used_at      timestamptz,
    last_used_at       timestamptz,
    PRIMARY KEY (user_id, model_id)
);

-- Per UTC day of the event: the 7-day and 30-day windows, spend per day.
CREATE TABLE user_model_daily (LIKE user_model_totals INCLUDING DEFAULTS);
ALTER TABLE user_model_daily
    ADD COLUMN day date NOT NULL,
    DROP COLUMN first_used_at,
    DROP COLUMN last_used_at,
    ADD PRIMARY KEY (user_id, day, model_id);

-- Every user's days summed per model, for the operators' global leaderboard: aggregates
-- only, no user ids, canary identities left out when written.
CREATE TABLE model_daily (LIKE user_model_daily INCLUDING DEFAULTS);
ALTER TABLE model_daily DROP COLUMN user_id, ADD PRIMARY KEY (day, model_id);

-- Each user's rows are theirs alone, as in 0002.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['llm_costs', 'user_model_totals', 'user_model_daily'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY consumers_write_every_users_rows ON %I'
                       ' TO stats_app USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY a_user_reads_their_own_rows ON %I'
                       ' FOR SELECT TO stats_user USING (user_id = (SELECT current_user_id()))', t);
        EXECUTE format('GRANT SELECT ON %I TO stats_user', t);
    END LOOP;
END $$;
