-- The price tiers themselves (OpenRouter's `pricing.overrides`), so a run is priced by the
-- tier in force for its prompt's size: [{"min_prompt_tokens": 200000 | null,
-- "prompt_price_per_1m": "4", "completion_price_per_1m": "18"}], prices as decimal strings.
ALTER TABLE model_prices ADD COLUMN price_tiers jsonb NOT NULL DEFAULT '[]';
