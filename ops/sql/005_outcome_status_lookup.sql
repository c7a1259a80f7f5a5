-- 005_outcome_status_lookup.sql - settle_apply_outcomes() without a scan of orders.
--
-- Contract: as in 001_init.sql (applied once by store_migrate() in its own transaction under
-- the migration lock; no transaction control; never edited once shipped).
--
-- 004's set-based statement ended by joining the batch to orders to report the status of
-- orders that did not move. Because the function plans once per connection (generic plan,
-- the batch counted as 100 rows), PostgreSQL chose a sequential scan of the whole orders
-- table plus a hash join for that join: 1-2.5 ms per batch with 10 000 orders, growing with
-- the table. The status is now read by primary key, and only for an order the batch did not
-- move. Everything else is 004's function unchanged: same input, same output, same guards.

-- plan_cache_mode: the statements below are planned once per connection instead of once per
-- call (a custom plan for every batch measured 1.6x the time per call at 32 jobs); their
-- plans do not depend on the batch's values.
CREATE OR REPLACE FUNCTION settle_apply_outcomes(p_batch jsonb)
RETURNS TABLE (o_i integer, o_changed boolean, o_status text, o_sqlstate text, o_message text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    r record;
    v_final text;
    v_i integer[];
    v_changed boolean[];
    v_status text[];
BEGIN
    IF jsonb_typeof(p_batch) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'settle_apply_outcomes expects a jsonb array' USING ERRCODE = '22023';
    END IF;
    PERFORM 1 FROM products p
     WHERE p.sku IN (SELECT i.sku FROM order_items i
                      WHERE i.order_id IN (SELECT e->>'order_id'
                                             FROM jsonb_array_elements(p_batch) e
                                            WHERE e->>'action' = 'complete'))
     ORDER BY p.sku FOR UPDATE OF p;

    -- The common case first: the whole batch as one set-based statement (a handful of
    -- statements' work for the batch instead of six per job). It is all or nothing: if any job
    -- of the batch would fail (an oversell, a foreign transaction key, ...), the statement
    -- fails, its savepoint rolls it back, and the batch is applied job by job below, where the
    -- failing job fails alone. Two jobs of one order in a batch go job by job too, so each sees
    -- the other's effect as it would in two transactions.
    -- A payment write without the PG's amount keeps the row's amount, which one INSERT ... ON
    -- CONFLICT for many orders cannot express: such a batch goes job by job as well.
    IF (SELECT count(DISTINCT e->>'order_id') = count(*)
               AND NOT bool_or(e->>'action' IN ('complete', 'fail')
                               AND jsonb_typeof(e->'amount_minor') IS DISTINCT FROM 'number')
          FROM jsonb_array_elements(p_batch) e
         WHERE e->>'action' IS DISTINCT FROM 'none') IS NOT FALSE THEN
        BEGIN
            WITH b AS (
                SELECT * FROM jsonb_populate_recordset(NULL::settle_outcome, p_batch)
            ), upd AS (
                -- Each order leaves PENDING (or is re-scheduled) only if still PENDING.
                UPDATE orders o SET
                       status = CASE b.action WHEN 'complete' THEN 'COMPLETED'
                                              WHEN 'fail' THEN 'FAILED'
                                              WHEN 'expire' THEN 'EXPIRED'
                                              WHEN 'manual_review' THEN 'MANUAL_REVIEW'
                                              ELSE o.status END,
                       completed_at = CASE WHEN b.action = 'complete' THEN now()
                                           ELSE o.completed_at END,
                       failure_reason = CASE WHEN b.action = 'complete' THEN NULL
                                             WHEN b.action = 'reschedule' THEN o.failure_reason
                                             ELSE b.reason END,
                       updated_at = CASE WHEN b.action = 'reschedule' THEN o.updated_at
                                         ELSE now() END,
                       next_check_at = CASE WHEN b.action = 'reschedule'
                                            THEN now() + b.next_check_ms
                                                         * interval '1 millisecond'
                                            ELSE o.next_check_at END,
                       check_count = CASE WHEN b.action = 'reschedule' THEN o.check_count + 1
                                          ELSE o.check_count END
                  FROM b
                 WHERE o.id = b.order_id AND o.status = 'PENDING'
                   AND b.action IN ('complete', 'fail', 'expire', 'manual_review',
                                    'reschedule')
                RETURNING o.id, o.status, o.user_id, o.amount_minor
            ), stock AS (
                -- Stock leaves only for the orders that did complete; CHECK (stock >= 0)
                -- refuses an oversell (and sends the batch job by job).
                UPDATE products p SET stock = p.stock - q.qty, updated_at = now()
                  FROM (SELECT i.sku, sum(i.qty) AS qty
                          FROM order_items i JOIN upd ON upd.id = i.order_id
                         WHERE upd.status = 'COMPLETED'
                         GROUP BY i.sku) q
                 WHERE p.sku = q.sku
                RETURNING p.sku
            ), pay AS (
                -- The payment, moved only while PENDING (settle_payment_upsert's rules).
                INSERT INTO payments AS p (order_id, transaction_key, user_id, amount_minor,
                                           status, reason, card_type, card_last4)
                SELECT b.order_id, b.transaction_key, upd.user_id,
                       coalesce(b.amount_minor, upd.amount_minor),
                       CASE WHEN b.action = 'complete' THEN 'SUCCESS' ELSE b.payment_status END,
                       CASE WHEN b.action = 'complete' THEN NULL ELSE b.reason END,
                       b.card_type, b.card_last4
                  FROM b JOIN upd ON upd.id = b.order_id
                 WHERE b.action = 'complete'
                    OR (b.action = 'fail' AND b.payment_status IS NOT NULL)
                ON CONFLICT (order_id) DO UPDATE SET
                       transaction_key = coalesce(EXCLUDED.transaction_key, p.transaction_key),
                       amount_minor = coalesce(EXCLUDED.amount_minor, p.amount_minor),
                       status = EXCLUDED.status, reason = EXCLUDED.reason,
                       card_type = coalesce(EXCLUDED.card_type, p.card_type),
                       card_last4 = coalesce(EXCLUDED.card_last4, p.card_last4),
                       updated_at = now()
                 WHERE p.status = 'PENDING'
                RETURNING p.order_id
            ), log AS (
                -- One job_log row per finished job; a redelivered job keeps its first row.
                INSERT INTO job_log (job_id, queue, producer_id, order_id, outcome, result,
                                     attempts, deliveries, last_error, worker, enqueued_at)
                SELECT b.job_id, b.queue, b.producer_id, b.order_id, b.outcome,
                       CASE WHEN upd.id IS NULL AND b.action <> 'none'
                                 AND b.result_unapplied IS NOT NULL
                            THEN b.result_unapplied ELSE b.result END,
                       b.attempts, b.deliveries, b.last_error, b.worker,
                       to_timestamp(b.enqueued_ms::double precision / 1000)
                  FROM b LEFT JOIN upd ON upd.id = b.order_id
                 WHERE b.job_id IS NOT NULL
                ON CONFLICT (job_id) DO NOTHING
                RETURNING job_id
            )
            -- Collected first, returned after: rows must not reach the caller from a
            -- statement that may still fail. An order that did not move reports the status
            -- this statement saw, looked up by its key only for such an order (coalesce does
            -- not evaluate the sub-select when the order moved).
            SELECT array_agg(b.i), array_agg(upd.id IS NOT NULL),
                   array_agg(coalesce(upd.status,
                                      (SELECT o.status FROM orders o WHERE o.id = b.order_id)))
              INTO v_i, v_changed, v_status
              FROM b LEFT JOIN upd ON upd.id = b.order_id;
            RETURN QUERY SELECT u.i, u.c, u.s, NULL::text, NULL::text
                           FROM unnest(v_i, v_changed, v_status) AS u(i, c, s);
            RETURN;
        EXCEPTION WHEN OTHERS THEN
            -- Rolled back to the block's start; job by job below. query_canceled
            -- (statement_timeout) is not caught: it ends the whole call.
            NULL;
        END;
    END IF;

    FOR r IN SELECT * FROM jsonb_populate_recordset(NULL::settle_outcome, p_batch)
    LOOP
        o_i := r.i;
        o_changed := false;
        o_status := NULL;
        o_sqlstate := NULL;
        o_message := NULL;
        BEGIN
            IF r.action = 'complete' THEN
                UPDATE orders SET status = 'COMPLETED', completed_at = now(),
                       updated_at = now(), failure_reason = NULL
                 WHERE id = r.order_id AND status = 'PENDING';
                IF FOUND THEN
                    o_changed := true;
                    -- CHECK (stock >= 0) refuses an oversell: this job alone rolls back.
                    UPDATE products p SET stock = p.stock - i.qty, updated_at = now()
                      FROM order_items i
                     WHERE i.order_id = r.order_id AND p.sku = i.sku;
                    PERFORM settle_payment_upsert(r.order_id, r.transaction_key,
                                                  r.amount_minor, 'SUCCESS', NULL,
                                                  r.card_type, r.card_last4);
                END IF;
            ELSIF r.action IN ('fail', 'expire', 'manual_review') THEN
                v_final := CASE r.action WHEN 'fail' THEN 'FAILED'
                                         WHEN 'expire' THEN 'EXPIRED'
                                         ELSE 'MANUAL_REVIEW' END;
                UPDATE orders SET status = v_final, failure_reason = r.reason,
                       updated_at = now()
                 WHERE id = r.order_id AND status = 'PENDING';
                IF FOUND THEN
                    o_changed := true;
                    IF r.action = 'fail' AND r.payment_status IS NOT NULL THEN
                        PERFORM settle_payment_upsert(r.order_id, r.transaction_key,
                                                      r.amount_minor, r.payment_status,
                                                      r.reason, r.card_type, r.card_last4);
                    END IF;
                END IF;
            ELSIF r.action = 'reschedule' THEN
                UPDATE orders SET next_check_at = now() + r.next_check_ms
                                                          * interval '1 millisecond',
                       check_count = check_count + 1
                 WHERE id = r.order_id AND status = 'PENDING';
                o_changed := FOUND;
            ELSIF r.action IS DISTINCT FROM 'none' THEN
                RAISE EXCEPTION 'unknown outcome action %', r.action USING ERRCODE = '22023';
            END IF;
            IF r.job_id IS NOT NULL THEN
                -- A transition that did not happen (the order had moved on) is logged so.
                INSERT INTO job_log (job_id, queue, producer_id, order_id, outcome, result,
                                     attempts, deliveries, last_error, worker, enqueued_at)
                VALUES (r.job_id, r.queue, r.producer_id, r.order_id, r.outcome,
                        CASE WHEN NOT o_changed AND r.action <> 'none'
                                  AND r.result_unapplied IS NOT NULL
                             THEN r.result_unapplied ELSE r.result END,
                        r.attempts, r.deliveries, r.last_error, r.worker,
                        to_timestamp(r.enqueued_ms::double precision / 1000))
                ON CONFLICT (job_id) DO NOTHING;
            END IF;
            IF r.order_id IS NOT NULL THEN
                SELECT status INTO o_status FROM orders WHERE id = r.order_id;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- query_canceled (statement_timeout) is not caught by OTHERS: it ends the whole
            -- batch, which the caller retries.
            o_changed := false;
            o_status := NULL;
            o_sqlstate := SQLSTATE;
            o_message := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END $$;
