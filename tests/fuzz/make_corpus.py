#!/usr/bin/python3
"""make_corpus.py - writes the committed seed corpora of the libFuzzer targets.

    /usr/bin/python3 tests/fuzz/make_corpus.py     # rewrites tests/fuzz/corpus/<target>/

Seeds are small, named after what they exercise, and meant to give each fuzzer a head start
into the interesting paths (valid jobs and answers a mutation away from invalid ones). The
fuzzers never write into these directories: ops/fuzz.sh runs them on a copy."""

import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
CARD = "1234-5678-9814-1451"
KEY = "20250816:TR:9577c5"


def j(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def job_seeds():
    rc = {"order_id": "order-1001", "user_id": "u-42"}
    rf = {"order_id": "order-1001", "user_id": "u-42", "transaction_key": KEY}
    s = {
        "reconcile_min": j(rc),
        "reconcile_full": j({**rc, "transaction_key": KEY, "id": "rc-1001",
                             "enqueued_at_ms": 1795229509271}),
        "reconcile_nulls": j({**rc, "transaction_key": None, "id": None}),
        "reconcile_unknown_fields": j({**rc, "extra": [1, {"x": 2}], "card": CARD}),
        "refund_min": j(rf),
        "refund_full": j({**rf, "amount": 2500, "reason": "customer asked", "restock": True,
                          "id": "rf-1"}),
        "refund_amount_zero": j({**rf, "amount": 0}),
        "refund_amount_negative": j({**rf, "amount": -1}),
        "refund_amount_float": j({**rf, "amount": 12.5}),
        "refund_amount_real_int":
            b'{"order_id":"o","user_id":"u","transaction_key":"k","amount":100.0}',
        "refund_amount_string": j({**rf, "amount": "100"}),
        "refund_amount_limit": j({**rf, "amount": 10**15}),
        "refund_amount_over_limit": j({**rf, "amount": 10**15 + 1}),
        "refund_amount_int64_max": j({**rf, "amount": 2**63 - 1}),
        "refund_amount_overflow":
            b'{"order_id":"o","user_id":"u","transaction_key":"k",'
            b'"amount":9223372036854775808}',
        "refund_amount_exp": b'{"order_id":"o","user_id":"u","transaction_key":"k","amount":1e3}',
        "refund_restock_string": j({**rf, "restock": "yes"}),
        "refund_reason_long": j({**rf, "reason": "r" * 257}),
        "missing_user": j({"order_id": "o"}),
        "order_id_number": j({"order_id": 12, "user_id": "u"}),
        "order_id_empty": j({"order_id": "", "user_id": "u"}),
        "order_id_129": j({"order_id": "x" * 129, "user_id": "u"}),
        "order_id_128": j({"order_id": "x" * 128, "user_id": "u"}),
        "order_id_null": j({"order_id": None, "user_id": "u"}),
        "order_id_object": j({"order_id": {"a": 1}, "user_id": "u"}),
        "order_id_escaped_nul": b'{"order_id":"a\\u0000b","user_id":"u"}',
        "order_id_raw_nul": b'{"order_id":"a\x00b","user_id":"u"}',
        "order_id_newline": b'{"order_id":"a\\nb","user_id":"u"}',
        "order_id_del": b'{"order_id":"a\x7fb","user_id":"u"}',
        "order_id_invalid_utf8": b'{"order_id":"\xff\xfe","user_id":"u"}',
        "order_id_surrogate": b'{"order_id":"\\ud800","user_id":"u"}',
        "order_id_unicode": j({"order_id": "주문-1", "user_id": "사용자"}),
        "order_id_sql": j({"order_id": "x'; DROP TABLE orders; --", "user_id": "u"}),
        "order_id_redis": j({"order_id": "{settle}*\r\nFLUSHALL\r\n", "user_id": "u"}),
        "duplicate_keys": b'{"order_id":"a","order_id":"b","user_id":"u"}',
        "not_json": b"not json",
        "truncated": b'{"order_id": "x"',
        "array": b"[1,2,3]",
        "string": b'"a string"',
        "number": b"42",
        "null": b"null",
        "true": b"true",
        "empty": b"",
        "bom": b'\xef\xbb\xbf{"order_id":"o","user_id":"u"}',
        "trailing_garbage": b'{"order_id":"o","user_id":"u"} x',
        "two_objects": b'{"order_id":"o","user_id":"u"}{"order_id":"p","user_id":"u"}',
        "nested_deep": b'{"a":' * 300 + b"1" + b"}" * 300,
        "array_deep": b"[" * 3000 + b"]" * 3000,
    }
    return s


def gw_tx(**over):
    d = {"transactionKey": KEY, "orderId": "1351039135", "cardType": "SAMSUNG",
         "cardNo": CARD, "amount": 5000, "status": "SUCCESS", "reason": None}
    d.update(over)
    return {k: v for k, v in d.items() if v is not Ellipsis}


def wrap(data, result="SUCCESS", **meta):
    return j({"meta": {"result": result, "errorCode": None, "message": None, **meta},
              "data": data})


def gateway_seeds():
    s = {
        "get_success": wrap(gw_tx()),
        "get_pending": wrap(gw_tx(status="PENDING")),
        "get_failed_reason": wrap(gw_tx(status="FAILED", reason="LIMIT_EXCEEDED")),
        "get_cancelled": wrap(gw_tx(status="CANCELLED", cancelledAmount=5000, balanceAmount=0)),
        "get_partial": wrap(gw_tx(status="PARTIALLY_CANCELLED", cancelledAmount=1000,
                                  balanceAmount=4000)),
        "get_reason_with_card": wrap(gw_tx(status="FAILED",
                                           reason="card 4111 1111 1111 1111 declined")),
        "get_reason_card_dots": wrap(gw_tx(status="FAILED", reason="card 4111.1111.1111.1111")),
        "get_card_no_digits": wrap(gw_tx(cardNo="xxxx")),
        "get_card_3_digits": wrap(gw_tx(cardNo="12-3")),
        "get_card_plain": wrap(gw_tx(cardNo="4111111111111111")),
        "get_card_type_card": wrap(gw_tx(cardType="4111111111111111")),
        "get_card_number": wrap(gw_tx(cardNo=4111111111111111)),
        "get_amount_zero": wrap(gw_tx(amount=0)),
        "get_amount_negative": wrap(gw_tx(amount=-5000)),
        "get_amount_real": wrap(gw_tx(amount=50.5)),
        "get_amount_string": wrap(gw_tx(amount="5000")),
        "get_amount_huge": wrap(gw_tx(amount=2**63 - 1)),
        "get_amount_missing": wrap(gw_tx(amount=...)),
        "get_order_missing": wrap(gw_tx(orderId=...)),
        "get_key_missing": wrap(gw_tx(transactionKey=...)),
        "get_key_ctrl": wrap(gw_tx(transactionKey="a\r\nX-Evil: 1")),
        "get_key_long": wrap(gw_tx(transactionKey="k" * 129)),
        "get_status_weird": wrap(gw_tx(status="WEIRD")),
        "get_status_nul":
            b'{"meta":{"result":"SUCCESS"},"data":{"transactionKey":"k","orderId":"o",'
            b'"amount":1,"status":"SUCCESS\\u0000X"}}',
        "get_status_number": wrap(gw_tx(status=1)),
        "get_status_lower": wrap(gw_tx(status="success")),
        "get_cancelled_negative": wrap(gw_tx(cancelledAmount=-1)),
        "get_reason_unicode": wrap(gw_tx(status="FAILED", reason="한도초과 " * 80)),
        "get_reason_ctrl": wrap(gw_tx(status="FAILED", reason="a\u0001b\u007fc\nd")),
        "meta_fail": wrap(None, result="FAIL", errorCode="Bad Request",
                          message="card 1234-5678-9814-1451 invalid"),
        "meta_fail_no_message": wrap(None, result="FAIL"),
        "meta_weird": wrap(gw_tx(), result="MAYBE"),
        "meta_missing": j({"data": gw_tx()}),
        "meta_result_number": j({"meta": {"result": 1}, "data": gw_tx()}),
        "data_null": wrap(None),
        "data_array": wrap([gw_tx()]),
        "duplicate_keys":
            b'{"meta":{"result":"SUCCESS"},"data":{"transactionKey":"k","orderId":"o",'
            b'"amount":1,"amount":2,"status":"SUCCESS"}}',
        "not_json": b"<html>502 Bad Gateway</html>",
        "invalid_json_card": b'{"meta":{"result":"SUCCESS"},"data":{"cardNo":4111111111111111x}}',
        "truncated": wrap(gw_tx())[:60],
        "top_array": b"[]",
        "empty": b"",
        "list_two": wrap({"orderId": "1351039135", "transactions": [
            {"transactionKey": "k1", "status": "FAILED", "reason": "x"},
            {"transactionKey": "k2", "status": "SUCCESS", "amount": 5000}]}),
        "list_pending": wrap({"orderId": "o1", "transactions": [
            {"transactionKey": "k1", "status": "PENDING"}]}),
        "list_empty": wrap({"orderId": "o1", "transactions": []}),
        "list_bad_item": wrap({"orderId": "o1", "transactions": [
            {"transactionKey": "k1", "status": "SUCCESS"}, 5]}),
        "list_item_other_order": wrap({"orderId": "o1", "transactions": [
            {"transactionKey": "k1", "orderId": "o2", "status": "SUCCESS", "amount": 1}]}),
        "list_not_array": wrap({"orderId": "o1", "transactions": {}}),
        "list_no_order": wrap({"transactions": []}),
        "list_amount_zero": wrap({"orderId": "o1", "transactions": [
            {"transactionKey": "k1", "status": "SUCCESS", "amount": 0}]}),
        "list_card": wrap({"orderId": "o1", "transactions": [
            {"transactionKey": "k1", "status": "SUCCESS", "cardNo": CARD}]}),
    }
    pay = {"transactionKey": "k1", "orderId": "o1", "userId": "u1", "amount": 5000,
           "status": "SUCCESS", "createdAt": 1795229509271}

    def page(payments, page=0, size=2, total_pages=1, total=None, **extra):
        return wrap({"page": page, "size": size, "totalPages": total_pages,
                     "totalElements": len(payments) if total is None else total,
                     "payments": payments, **extra})

    s.update({
        "page_two": page([pay, {**pay, "transactionKey": "k2", "status": "PARTIALLY_CANCELLED",
                                "cancelledAmount": 1000, "balanceAmount": 4000}]),
        "page_empty": page([], page=3, total_pages=3, total=300),
        "page_minimal_item": page([{"transactionKey": "k", "orderId": "o", "amount": 1,
                                    "status": "PENDING"}], size=1),
        "page_over_size": page([pay, pay, pay], size=2),
        "page_past_last": page([pay], page=1, total_pages=1),
        "page_size_huge": page([], size=100000),
        "page_size_zero": page([], size=0),
        "page_negative": page([], page=-1),
        "page_missing_total": wrap({"page": 0, "size": 1, "payments": []}),
        "page_item_no_amount": page([{k: v for k, v in pay.items() if k != "amount"}]),
        "page_item_bad_user": page([{**pay, "userId": "u\n1"}]),
        "page_item_created_negative": page([{**pay, "createdAt": -5}]),
        "page_payments_object": page({}),
    })
    return s


def config_seeds():
    s = {
        "empty": b"",
        "work": b"work",
        "redis_password_flag": b"work\n--redis-url=redis://:s3cret-pw@127.0.0.1:6380/2",
        "redis_user_password": b"work\n--redis-url\nredis://alice:p%40ss@[::1]:6379/0",
        "redis_bad_scheme": b"--redis-url=rediss://:pw@h:1/0",
        "redis_bad_port": b"--redis-url=redis://:pw@h:70000/0",
        "redis_query": b"--redis-url=redis://:pw@h:1/0?timeout=1",
        "redis_env": b"env SETTLE_REDIS_URL=redis://:envsecret@10.0.0.1/3\nstats",
        "redis_file_env": b"env SETTLE_REDIS_URL_FILE=redis://:filesecret@h:1/0\n",
        "redis_file_flag": b"--redis-url-file=redis://:filesecret@h:1/0\nconfig",
        "redis_file_and_env":
            b"env SETTLE_REDIS_URL_FILE=redis://h\nenv SETTLE_REDIS_URL=redis://h",
        "db_uri_password":
            b"--database-url=postgresql://app:dbsecret@db:5432/settle?sslmode=require",
        "db_query_password": b"--database-url=postgresql://db/settle?user=app&password=dbsecret",
        "db_conninfo": b"--database-url=host=db user=app password='db secret\\'s' dbname=settle",
        "db_conninfo_sslpassword": b"--database-url=host=db sslpassword=kk sslmode=verify-full",
        "db_file_flag": b"--database-url-file=postgresql://u:filepw@h/db",
        "db_bad": b"--database-url=mysql://h",
        "gateway_https": b"--gateway-url=https://pg.example:443/",
        "gateway_bad": b"--gateway-url=ftp://x",
        "gateway_space": b"--gateway-url=http://a b",
        "queues": b"--queues=refund\nenv SETTLE_QUEUES=reconcile,refund",
        "queues_bad": b"--queues=reconcile,reconcile",
        "numbers": b"--concurrency=1024\n--claim-batch=1\n--db-pool-size=0\n--job-max-bytes=128",
        "numbers_bad": b"--concurrency=-1\n--lease-ms=1e3",
        "number_overflow": b"--retry-max-attempts=99999999999999999999999",
        "schedule": b"--check-schedule-ms=200,400,800",
        "schedule_bad": b"--check-schedule-ms=,",
        "window_too_small": b"--payment-window-ms=1000\n--gateway-slowest-ms=60000",
        "log_level": b"--log-level=debug\nenv SETTLE_LOG_LEVEL=verbose",
        "namespace": b"--namespace=a.b-c_d\n--worker-id=host:1",
        "namespace_bad": b"--namespace={x}",
        "worker_id_utf8": b"--worker-id=\xff\xfe",
        "metrics_addr": b"--metrics-addr=\n--metrics-addr=127.0.0.1:0",
        "missing_value": b"work\n--redis-url",
        "double_dash": b"enqueue\nreconcile\n--\n--redis-url=x",
        "breaker": b"--breaker-failure-pct=100\n--breaker-window-ms=1000\n--breaker-open-ms=5\n"
                   b"--breaker-open-max-ms=4",
        "urls_only": b"url redis://user:pw@host:1/2\nurl postgresql://u:pw@h/db?password=x\n"
                     b"url password=abc host=x",
        "url_conninfo_garbage": b"url host = 'unterminated password=x",
    }
    return s


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    write("fuzz_job", job_seeds())
    write("fuzz_gateway", gateway_seeds())
    write("fuzz_config", config_seeds())
