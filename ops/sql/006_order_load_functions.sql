-- 006_order_load_functions.sql - the batched order read as two functions whose plans
-- PostgreSQL keeps per connection.
--
-- Contract: as in 001_init.sql (applied once by store_migrate() in its own transaction under
-- the migration lock; no transaction control; never edited once shipped).
--
-- A worker reads the orders (with their payment) and the items of a batch of jobs in one
-- read-only transaction. Sent as plain parameterised statements (unnamed, so that PgBouncer in
-- transaction pooling works), both queries were parsed and planned again for every batch: at
-- ~4 000 jobs/s that was ~24 us of PostgreSQL CPU per job, 15 % of PostgreSQL's share
-- (measured against named prepared statements, which PgBouncer before 1.21 cannot carry). A
-- PL/pgSQL function plans its queries once per connection, like the outcome function of 004,
-- and the statement that calls it is trivial to plan. The rows are the same as the statements
-- returned, column for column; the worker reads them by position.

-- plan_cache_mode: one generic plan per connection. Orders and items are reached by primary
-- key for whatever number of ids a batch holds (at most SETTLE_DB_BATCH), so the plan does not
-- depend on the values.
CREATE FUNCTION settle_load_orders(p_ids text[])
RETURNS TABLE (r_id text, r_user_id text, r_status text, r_failure_reason text,
               r_amount_minor bigint, r_refunded_minor bigint, r_age_ms bigint,
               r_check_count integer, r_transaction_key text, r_payment_status text)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''),
           o.amount_minor, o.refunded_minor,
           greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint),
           o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, '')
      FROM orders o LEFT JOIN payments p ON p.order_id = o.id
     WHERE o.id = ANY(p_ids);
END
$$;

-- The items of each order, in SKU order, at most p_max_items per order (the worker refuses an
-- order with more; one more than it accepts is enough to tell).
CREATE FUNCTION settle_load_items(p_ids text[], p_max_items integer)
RETURNS TABLE (r_order_id text, r_sku text, r_qty integer)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    SELECT x.order_id, x.sku, x.qty
      FROM (SELECT i.order_id, i.sku, i.qty,
                   row_number() OVER (PARTITION BY i.order_id ORDER BY i.sku) AS n
              FROM order_items i
             WHERE i.order_id = ANY(p_ids)) x
     WHERE x.n <= p_max_items
     ORDER BY x.order_id, x.sku;
END
$$;
