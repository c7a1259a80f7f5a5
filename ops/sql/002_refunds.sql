-- 002_refunds.sql - refunds: one row per refund, written before the PG is first asked.
--
-- Contract: as in 001_init.sql (applied once by store_migrate() in its own transaction under
-- the migration lock; no transaction control; never edited once shipped; money in bigint
-- minor units; statuses as CHECKed closed sets; no card data).
--
-- A refund's id is its Idempotency-Key at the PG: the refund job's "id", or "rf:" + 32 hex
-- digits derived from the request (src/refund.c), so re-enqueueing the same request finds
-- the same row and never refunds twice. The row is inserted (state REQUESTED) in the
-- transaction that holds the payment's row lock (SELECT ... FROM payments ... FOR UPDATE) and
-- checks that the live refunds of the order (every state but FAILED) plus this one stay
-- within payments.amount_minor, so two concurrent refunds cannot together exceed the charge.
-- State changes are conditional UPDATEs following src/refund.c's table:
--   REQUESTED -> SUCCEEDED | FAILED | UNKNOWN | MANUAL_REVIEW
--   UNKNOWN -> SUCCEEDED | FAILED | MANUAL_REVIEW;  MANUAL_REVIEW -> SUCCEEDED | FAILED
-- payments.refunded_minor / orders.refunded_minor grow in the same transaction that moves a
-- refund to SUCCEEDED, and only when that UPDATE changed the row.
CREATE TABLE refunds (
    id              text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 128),
    order_id        text NOT NULL REFERENCES orders (id),
    transaction_key text NOT NULL,
    user_id         text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0), -- resolved at creation
    reason          text,
    restock         boolean NOT NULL DEFAULT false,
    state           text NOT NULL DEFAULT 'REQUESTED'
                    CHECK (state IN ('REQUESTED', 'SUCCEEDED', 'FAILED', 'UNKNOWN',
                                     'MANUAL_REVIEW')),
    pg_status       text,    -- the PG's last word: CANCELLED, PARTIALLY_CANCELLED, HTTP 409, ...
    failure_reason  text,    -- FAILED / MANUAL_REVIEW: the DLQ reason code
    last_error      text,    -- one sentence for people
    attempts        integer NOT NULL DEFAULT 0, -- PG answers (or silences) recorded
    -- The restock step ran for this refund (units were added back where the order had taken
    -- them); set at most once per order, in the transaction that adds the units.
    restocked       boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The over-refund guard sums an order's refunds; support pages list them.
CREATE INDEX refunds_order_id_idx ON refunds (order_id);
-- Operators watch these: refunds without a definite answer.
CREATE INDEX refunds_open_idx ON refunds (updated_at)
    WHERE state IN ('REQUESTED', 'UNKNOWN', 'MANUAL_REVIEW');
