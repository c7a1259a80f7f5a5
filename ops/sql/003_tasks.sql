-- 003_tasks.sql - scheduled work (issue 4): the run record that makes every periodic task run
-- once per period across all workers, and what the tasks write.
--
-- Contract: as in 001_init.sql (applied once by store_migrate() in its own transaction under
-- the migration lock; no transaction control; never edited once shipped; money in bigint
-- minor units; statuses as CHECKed closed sets; no card data).
--
-- task_runs is the arbiter. A worker claims a run by inserting its (task, period) row; the
-- primary key lets exactly one insert win (INSERT ... ON CONFLICT DO NOTHING RETURNING), and
-- only the winner runs the task. Periods:
--   interval tasks (stale_sweep, order_expiry, orphan_sweep): the run number, "1", "2", ...
--     also kept as an integer in seq. Run n+1 is due once run n has finished and
--     now() >= run n's started_at + the interval, so runs start max(run time, interval)
--     apart (seed 004). All times are PostgreSQL's now(): one clock for every worker.
--   daily tasks (stock_sync, daily_stats): the UTC date (YYYY-MM-DD) of the most recent
--     scheduled time of day that has passed. A failed daily run is retried (attempts).
--   manual runs (`settle run`): "manual:<UTC timestamp>:<worker>", seq NULL, so they never
--     block or replace a scheduled run.
-- A 'running' row whose heartbeat_at is older than SETTLE_TASK_STALE_MS belongs to a worker
-- that died: the next claimant marks it failed ('worker died ...') and runs the next period.
CREATE TABLE task_runs (
    task         text NOT NULL CHECK (task IN ('stale_sweep', 'order_expiry', 'orphan_sweep',
                                               'stock_sync', 'daily_stats')),
    period       text NOT NULL CHECK (octet_length(period) BETWEEN 1 AND 200),
    seq          bigint CHECK (seq IS NULL OR seq > 0), -- interval runs only
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(), -- refreshed while the run progresses
    finished_at  timestamptz,
    worker       text NOT NULL,
    dry_run      boolean NOT NULL DEFAULT false,
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    attempts     integer NOT NULL DEFAULT 1 CHECK (attempts > 0), -- daily retries
    summary      jsonb,
    error        text,
    PRIMARY KEY (task, period),
    CHECK ((status = 'running') = (finished_at IS NULL))
);

-- The due check reads an interval task's latest run.
CREATE INDEX task_runs_seq_idx ON task_runs (task, seq DESC) WHERE seq IS NOT NULL;

-- The PG orphan sweep's decisions, one row per (run, PG payment) that was not simply matched
-- to its paid order: refund_enqueued, already_queued, capped, reconcile_enqueued,
-- refund_in_progress, no_order, amount_mismatch, user_mismatch, other_payment,
-- manual_review, not_refundable, failed. Matched payments are counted in
-- task_runs.summary only (a 24 h window swept every 10 minutes would store each one 144
-- times). A dry run writes none.
CREATE TABLE orphan_decisions (
    task            text NOT NULL DEFAULT 'orphan_sweep',
    period          text NOT NULL,
    transaction_key text NOT NULL,
    order_id        text NOT NULL,
    user_id         text,
    amount_minor    bigint NOT NULL,
    pg_status       text NOT NULL, -- SUCCESS or PARTIALLY_CANCELLED
    pg_created_at   timestamptz,
    order_status    text,          -- NULL when there is no such order
    decision        text NOT NULL,
    detail          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task, period, transaction_key)
);

CREATE INDEX orphan_decisions_key_idx ON orphan_decisions (transaction_key);
CREATE INDEX orphan_decisions_created_at_idx ON orphan_decisions (created_at);

-- The nightly stock sync's findings: one row per SKU whose Redis available units disagreed
-- with PostgreSQL on hand minus reserved (and minus units of sales not yet applied in
-- PostgreSQL). redis_before NULL: the key was missing. A dry run writes none.
CREATE TABLE stock_mismatches (
    period       text NOT NULL,
    sku          text NOT NULL,
    pg_on_hand   bigint NOT NULL,
    reserved     bigint NOT NULL, -- units of reservations in state reserved
    unapplied    bigint NOT NULL, -- committed in Redis, order not yet COMPLETED in PostgreSQL
    redis_before bigint,
    redis_after  bigint NOT NULL, -- what Redis should hold (and holds, when repaired)
    repaired     boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (period, sku)
);

CREATE INDEX stock_mismatches_created_at_idx ON stock_mismatches (created_at);

-- One row per UTC day, written once (INSERT ... ON CONFLICT DO NOTHING; `settle run
-- daily_stats --force` recomputes with DO UPDATE). Cohorts: orders_created and the
-- expired/failed/cancelled counts are about orders created that day (their status when the
-- row was computed; cancelled = fully refunded); completed and revenue are about orders
-- completed that day (gross, before refunds); refunded is refunds that SUCCEEDED that day.
CREATE TABLE daily_stats (
    date                date PRIMARY KEY,
    orders_created      bigint NOT NULL,
    orders_completed    bigint NOT NULL,
    revenue_minor       bigint NOT NULL,
    avg_order_minor     bigint NOT NULL, -- revenue / completed, rounded; 0 when none
    orders_cancelled    bigint NOT NULL,
    orders_expired      bigint NOT NULL,
    orders_failed       bigint NOT NULL,
    refunds_count       bigint NOT NULL,
    refunded_minor      bigint NOT NULL,
    computed_at         timestamptz NOT NULL DEFAULT now(),
    computed_by         text NOT NULL -- the task run (period) that wrote the row
);

-- The daily statistics read orders and refunds by day.
CREATE INDEX orders_created_at_idx ON orders (created_at);
CREATE INDEX orders_completed_at_idx ON orders (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX refunds_succeeded_idx ON refunds (updated_at) WHERE state = 'SUCCEEDED';
