-- What the guard needs of a catalog entry besides its base prices: the highest of its price
-- tiers (the cap holds for it), and whether it is priced per token at all (a model whose
-- output is not text is priced per image, per second, ...: never free, never per token).
ALTER TABLE model_prices
    ADD COLUMN highest_prompt_price_per_1m     numeric,
    ADD COLUMN highest_completion_price_per_1m numeric,
    ADD COLUMN priced_per_token                boolean NOT NULL DEFAULT true;
