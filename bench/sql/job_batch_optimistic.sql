-- job_batch_optimistic.sql - pgbench script: as job_batch.sql (:batch jobs per round trip and
-- per transaction, pgbench -D batch=64), but without a savepoint per job
-- (bench_apply_complete_batch_optimistic in proposal.sql): if one job failed, the whole batch
-- would roll back and the worker would apply its jobs one at a time.
SELECT nextval('bench_job_seq') AS b \gset
\set lo :b * :batch
\set hi :lo + :batch - 1
SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''), o.amount_minor, o.refunded_minor, greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint), o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, ''), (SELECT array_agg(i.sku || ':' || i.qty ORDER BY i.sku) FROM order_items i WHERE i.order_id = o.id) FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = ANY (array(SELECT 'e' || k FROM generate_series(:lo::bigint, :hi::bigint) k));
SELECT bench_apply_complete_batch_optimistic(array(SELECT 'e' || k FROM generate_series(:lo::bigint, :hi::bigint) k), array(SELECT 'te' || k FROM generate_series(:lo::bigint, :hi::bigint) k), array(SELECT 'j' || k FROM generate_series(:lo::bigint, :hi::bigint) k), 'bench:1');
