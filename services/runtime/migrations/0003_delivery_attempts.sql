-- Tries of redelivered messages, counted by the consumer itself: JetStream's delivery count
-- also grows when a message is redelivered without having been tried (its consumer could
-- not reach PostgreSQL, or was killed with the message still in its buffer), and such
-- deliveries must not use up a message's budget. A row exists only for a message that was
-- delivered more than once and is not applied yet.
CREATE TABLE delivery_attempts (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    tries       integer     NOT NULL,
    last_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
