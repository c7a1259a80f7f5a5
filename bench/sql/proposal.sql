-- proposal.sql - what the outcome transaction of a successful reconcile job could look like
-- as one server-side call, for the pg_cost experiment (bench/pg_cost.py). It is created in
-- the benchmark's throwaway database only; it is a proposal for ops/sql/, not part of the
-- product. Same statements and guards as src/store.c (store_apply_outcome_work with
-- STORE_ACTION_COMPLETE): the order moves PENDING -> COMPLETED only if still PENDING; only
-- then are its products locked in sku order, stock taken and the payment recorded; the job_log
-- row is written ON CONFLICT DO NOTHING; the order's status is returned. Everything runs in
-- the caller's transaction, so durability and idempotency are unchanged; PL/pgSQL prepares
-- each statement once per connection instead of once per job.

CREATE OR REPLACE FUNCTION bench_apply_complete(p_order text, p_tx text, p_amount bigint,
    p_card_type text, p_last4 text, p_job_id text, p_queue text, p_producer text,
    p_worker text, p_attempts integer, p_deliveries integer, p_enqueued_ms double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    changed boolean := false;
    st text;
BEGIN
    UPDATE orders SET status = 'COMPLETED', completed_at = now(), updated_at = now(),
           failure_reason = NULL
     WHERE id = p_order AND status = 'PENDING';
    IF FOUND THEN
        changed := true;
        PERFORM 1 FROM products p JOIN order_items i ON i.sku = p.sku
          WHERE i.order_id = p_order ORDER BY p.sku FOR UPDATE OF p;
        UPDATE products p SET stock = p.stock - i.qty, updated_at = now()
          FROM order_items i WHERE i.order_id = p_order AND p.sku = i.sku;
        INSERT INTO payments AS p (order_id, transaction_key, user_id, amount_minor, status,
                                   reason, card_type, card_last4)
        SELECT o.id, p_tx, o.user_id, coalesce(p_amount, o.amount_minor), 'SUCCESS', NULL,
               p_card_type, p_last4
          FROM orders o WHERE o.id = p_order
        ON CONFLICT (order_id) DO UPDATE SET
               transaction_key = coalesce(EXCLUDED.transaction_key, p.transaction_key),
               amount_minor = coalesce(p_amount, p.amount_minor),
               status = EXCLUDED.status, reason = EXCLUDED.reason,
               card_type = coalesce(EXCLUDED.card_type, p.card_type),
               card_last4 = coalesce(EXCLUDED.card_last4, p.card_last4), updated_at = now()
         WHERE p.status = 'PENDING';
    END IF;
    INSERT INTO job_log (job_id, queue, producer_id, order_id, outcome, result, attempts,
                         deliveries, last_error, worker, enqueued_at)
    VALUES (p_job_id, p_queue, p_producer, p_order, 'done',
            CASE WHEN changed THEN 'completed' ELSE 'skipped' END, p_attempts, p_deliveries,
            NULL, p_worker, to_timestamp(p_enqueued_ms / 1000))
    ON CONFLICT (job_id) DO NOTHING;
    SELECT status INTO st FROM orders WHERE id = p_order;
    RETURN (CASE WHEN changed THEN '1 ' ELSE '0 ' END) || coalesce(st, '');
END $$;

-- K outcomes in one transaction. Each job runs in its own sub-block (a savepoint): a job
-- whose statements fail (e.g. CHECK stock >= 0) is rolled back alone and reported, the others
-- commit together, and the worker acks only the jobs reported applied after COMMIT returned.
CREATE OR REPLACE FUNCTION bench_apply_complete_batch(p_orders text[], p_tx text[],
    p_job_ids text[], p_worker text)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    out text[] := '{}';
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_orders, 1), 0) LOOP
        BEGIN
            out := out || bench_apply_complete(p_orders[i], p_tx[i], 100, 'SAMSUNG', '1451',
                                               p_job_ids[i], 'reconcile', NULL, p_worker, 0,
                                               1, 1795229421183);
        EXCEPTION WHEN OTHERS THEN
            out := out || ('E ' || SQLSTATE);
        END;
    END LOOP;
    RETURN out;
END $$;

-- The same without a savepoint per job: the optimistic form. If any job of the batch fails,
-- the whole transaction rolls back (nothing of the batch is committed or acked) and the
-- worker applies those jobs one at a time; the common case pays no subtransactions.
CREATE OR REPLACE FUNCTION bench_apply_complete_batch_optimistic(p_orders text[],
    p_tx text[], p_job_ids text[], p_worker text)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    out text[] := '{}';
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_orders, 1), 0) LOOP
        out := out || bench_apply_complete(p_orders[i], p_tx[i], 100, 'SAMSUNG', '1451',
                                           p_job_ids[i], 'reconcile', NULL, p_worker, 0, 1,
                                           1795229421183);
    END LOOP;
    RETURN out;
END $$;
