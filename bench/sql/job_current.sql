-- job_current.sql - pgbench script: the PostgreSQL work of one successful reconcile job,
-- statement for statement as settle sends it today (src/store.c, store_load_order_work and
-- store_apply_outcome_work for STORE_ACTION_COMPLETE): two transactions, 14 round trips.
-- Run with pgbench -M extended (unnamed statements, parsed and planned every time, as
-- PQexecParams does). :i picks the next prepared order (pg_cost.py creates orders e<i>).
SELECT nextval('bench_job_seq') AS i \gset
BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
SELECT set_config('statement_timeout', '5000', true);
SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''), o.amount_minor, o.refunded_minor, greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint), o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, '') FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = 'e' || :i;
SELECT sku, qty FROM order_items WHERE order_id = 'e' || :i ORDER BY sku LIMIT 65;
COMMIT;
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
UPDATE orders SET status = 'COMPLETED', completed_at = now(), updated_at = now(), failure_reason = NULL WHERE id = 'e' || :i AND status = 'PENDING';
SELECT p.sku FROM products p JOIN order_items i ON i.sku = p.sku WHERE i.order_id = 'e' || :i ORDER BY p.sku FOR UPDATE OF p;
UPDATE products p SET stock = p.stock - i.qty, updated_at = now() FROM order_items i WHERE i.order_id = 'e' || :i AND p.sku = i.sku;
INSERT INTO payments AS p (order_id, transaction_key, user_id, amount_minor, status, reason, card_type, card_last4) SELECT o.id, 'te' || :i, o.user_id, coalesce(100::bigint, o.amount_minor), 'SUCCESS', NULL, 'SAMSUNG', '1451' FROM orders o WHERE o.id = 'e' || :i ON CONFLICT (order_id) DO UPDATE SET transaction_key = coalesce(EXCLUDED.transaction_key, p.transaction_key), amount_minor = coalesce(100::bigint, p.amount_minor), status = EXCLUDED.status, reason = EXCLUDED.reason, card_type = coalesce(EXCLUDED.card_type, p.card_type), card_last4 = coalesce(EXCLUDED.card_last4, p.card_last4), updated_at = now() WHERE p.status = 'PENDING';
INSERT INTO job_log (job_id, queue, producer_id, order_id, outcome, result, attempts, deliveries, last_error, worker, enqueued_at) VALUES ('j' || :i, 'reconcile', NULL, 'e' || :i, 'done', 'completed', 0, 1, NULL, 'bench:1', to_timestamp(1795229421183::double precision / 1000)) ON CONFLICT (job_id) DO NOTHING;
SELECT status FROM orders WHERE id = 'e' || :i;
COMMIT;
