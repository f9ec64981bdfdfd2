-- The relay is woken by `outbox.add` itself (pg_notify in its INSERT), and only for rows
-- that are not published at commit: a trigger woke it for every insert, so each
-- publish-at-commit transaction also cost the relay an empty query.
DROP TRIGGER outbox_inserted ON outbox;
DROP FUNCTION outbox_notify();
