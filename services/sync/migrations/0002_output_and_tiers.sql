-- What a model outputs, its higher price tiers, and the unit prices of models not priced per
-- token. Rows written before this migration read as text-only with no tiers; the next sync
-- compares them with the listing and rewrites (and announces) the ones that differ.
ALTER TABLE models
    ADD COLUMN output_modalities text[] NOT NULL DEFAULT '{text}',
    -- [{"min_prompt_tokens": 200000 | null, "prompt_price_per_1m": "2.5",
    --   "completion_price_per_1m": "15"}, ...]; prices as decimal strings, USD per 1M
    ADD COLUMN price_tiers       jsonb  NOT NULL DEFAULT '[]',
    -- {"image": "0.04", "request": "0.001", ...}: USD per unit, as the source lists them;
    -- only for models not priced per token (whose per-token prices are then NULL)
    ADD COLUMN unit_prices       jsonb  NOT NULL DEFAULT '{}';

ALTER TABLE price_history
    ADD COLUMN price_tiers jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN unit_prices jsonb NOT NULL DEFAULT '{}';
