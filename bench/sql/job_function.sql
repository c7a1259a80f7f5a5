-- job_function.sql - pgbench script: the same job with proposal.sql: the order read as one
-- statement (items aggregated; a single statement has its own snapshot, so no BEGIN, SET and
-- COMMIT round trips) and the whole outcome as one call of a PL/pgSQL function in an implicit
-- transaction (PL/pgSQL keeps its statements' plans per connection). 2 round trips (+ the
-- sequence that picks the order).
SELECT nextval('bench_job_seq') AS i \gset
SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''), o.amount_minor, o.refunded_minor, greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint), o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, ''), (SELECT array_agg(i.sku || ':' || i.qty ORDER BY i.sku) FROM order_items i WHERE i.order_id = o.id) FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = 'e' || :i;
SELECT bench_apply_complete('e' || :i, 'te' || :i, 100, 'SAMSUNG', '1451', 'j' || :i, 'reconcile', NULL, 'bench:1', 0, 1, 1795229421183);
