-- 001_init.sql - the initial schema: products, orders, order_items, payments, job_log.
--
-- Contract (every file in ops/sql/ follows it):
--   * The version is the number the file name starts with (001 here). store_migrate()
--     (src/store.c) applies each file at most once, in file-name order, inside its own
--     transaction that also holds pg_advisory_xact_lock and records the version in
--     schema_migrations(version, name, applied_at); the store creates that table itself.
--   * So a file contains no transaction control (BEGIN/COMMIT/ROLLBACK) and nothing that
--     cannot run inside a transaction block (e.g. CREATE INDEX CONCURRENTLY, VACUUM).
--     A failure rolls the whole file back and leaves its version unrecorded.
--   * A shipped file is never edited; a change to the schema is a new, higher-numbered file.
--   * Money is bigint minor units (cents), never float or numeric; timestamps are timestamptz.
--   * Status columns are closed sets enforced by CHECK constraints, not free text.
--   * Card data: only the card type and the last 4 digits are ever stored, never a full PAN.
--   * Objects are unqualified, so they live in the first schema of the role's search_path.

-- Catalogue and on-hand stock. Reservations live in Redis; this is the durable count,
-- decremented when an order completes. The CHECK makes overselling a rejected transaction.
CREATE TABLE products (
    sku         text PRIMARY KEY CHECK (octet_length(sku) BETWEEN 1 AND 64),
    name        text NOT NULL DEFAULT '',
    price_minor bigint NOT NULL DEFAULT 0 CHECK (price_minor >= 0),
    stock       integer NOT NULL CHECK (stock >= 0), -- units on hand
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per order. settle moves an order out of PENDING exactly once; every such UPDATE
-- is guarded by "AND status = 'PENDING'", so a callback handler that got there first wins.
CREATE TABLE orders (
    id             text PRIMARY KEY,
    user_id        text NOT NULL,
    status         text NOT NULL DEFAULT 'PENDING'
                   CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED', 'EXPIRED',
                                     'MANUAL_REVIEW', 'REFUNDED', 'PARTIALLY_REFUNDED')),
    amount_minor   bigint NOT NULL CHECK (amount_minor > 0),
    refunded_minor bigint NOT NULL DEFAULT 0
                   CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    next_check_at  timestamptz,
    check_count    integer NOT NULL DEFAULT 0
);

-- Sweeps look for old PENDING orders only; the partial index stays small.
CREATE INDEX orders_pending_created_at_idx ON orders (created_at) WHERE status = 'PENDING';

-- The lines of an order; the stock decrement joins on these.
CREATE TABLE order_items (
    order_id text NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    sku      text NOT NULL REFERENCES products (sku),
    qty      integer NOT NULL CHECK (qty > 0),
    PRIMARY KEY (order_id, sku)
);

-- At most one payment per order, keyed by the gateway's transaction key (unique, so one
-- gateway transaction can never settle two orders).
CREATE TABLE payments (
    order_id        text PRIMARY KEY REFERENCES orders (id) ON DELETE CASCADE,
    transaction_key text UNIQUE,
    user_id         text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    status          text NOT NULL
                    CHECK (status IN ('PENDING', 'SUCCESS', 'FAILED', 'CANCELLED', 'REFUNDED',
                                      'PARTIALLY_REFUNDED')),
    reason          text,
    card_type       text,
    card_last4      text CHECK (card_last4 ~ '^[0-9]{4}$'),
    refunded_minor  bigint NOT NULL DEFAULT 0
                    CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per finished job (done or dead), written in the same transaction as its effect.
-- The primary key plus ON CONFLICT DO NOTHING keeps the first row of a redelivered job.
CREATE TABLE job_log (
    job_id      text PRIMARY KEY,
    queue       text NOT NULL,
    producer_id text,
    order_id    text,
    outcome     text NOT NULL CHECK (outcome IN ('done', 'dead')),
    result      text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    deliveries  integer NOT NULL DEFAULT 0,
    last_error  text,
    worker      text,
    enqueued_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX job_log_order_id_idx ON job_log (order_id);
CREATE INDEX job_log_finished_at_idx ON job_log (finished_at);
