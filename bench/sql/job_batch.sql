-- job_batch.sql - pgbench script: :batch jobs per round trip with proposal.sql (pgbench -D
-- batch=16): the orders of the batch read in one statement (= ANY), their outcomes applied by
-- one call in one transaction, each job in its own sub-block. One pgbench "transaction" here
-- is :batch jobs.
SELECT nextval('bench_job_seq') AS b \gset
\set lo :b * :batch
\set hi :lo + :batch - 1
SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''), o.amount_minor, o.refunded_minor, greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint), o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, ''), (SELECT array_agg(i.sku || ':' || i.qty ORDER BY i.sku) FROM order_items i WHERE i.order_id = o.id) FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = ANY (array(SELECT 'e' || k FROM generate_series(:lo::bigint, :hi::bigint) k));
SELECT bench_apply_complete_batch(array(SELECT 'e' || k FROM generate_series(:lo::bigint, :hi::bigint) k), array(SELECT 'te' || k FROM generate_series(:lo::bigint, :hi::bigint) k), array(SELECT 'j' || k FROM generate_series(:lo::bigint, :hi::bigint) k), 'bench:1');
