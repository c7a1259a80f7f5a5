/*
 * store.c - PostgreSQL access: a bounded pool of libpq connections, the embedded schema
 * migrations, order lookups and the transactional application of job outcomes (orders,
 * payments, products.stock and job_log in one transaction).
 *
 * Threads: store_create/store_destroy on the loop thread (destroy once no work runs); every
 * other function blocks and runs on a uv pool thread or in a CLI command. The pool mutex
 * guards only the slot table; a borrowed PGconn belongs to one thread until it is returned.
 * Owns: the copied conninfo, the slot table and every PGconn in it.
 *
 * SQL: PQexecParams (or PQsendQueryParams in a pipeline) with text parameters only (unnamed
 * statements, so PgBouncer in transaction pooling works); the one exception is the text of a
 * shipped migration. With SETTLE_DB_PREPARED the statements every batch sends (hot_stmts) are
 * named prepared statements instead, prepared once per connection. The batched order loads
 * and outcome writes send a whole transaction as one libpq pipeline (tx_pipeline): one
 * network flight per batch. Every
 * transaction opens with BEGIN and set_config('statement_timeout', $1, true), which is
 * SET LOCAL with a parameter. Every write is conditional (status = 'PENDING') or ON CONFLICT,
 * so running an outcome twice, or retrying after a COMMIT whose answer was lost, is harmless.
 */
#include "settle/store.h"
#include "settle/embedded.h"
#include "settle/error.h"
#include "settle/log.h"
#include "settle/text.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Transaction-level advisory lock that serialises migrations across workers; the key is
 * "settlemg" read as a big-endian 64-bit integer. */
#define MIGRATE_LOCK_SQL "SELECT pg_advisory_xact_lock(8315180330393103719)"

/* Default failure_reason of an expired order. */
#define EXPIRE_REASON_DEFAULT "payment_window_passed"

#define BEGIN_SQL "BEGIN"
/* Lookups read from one snapshot and can never write by accident. */
#define BEGIN_READ_SQL "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"

/* The order reads of a batch, through migration 006's functions: PostgreSQL plans their
 * queries once per connection, where these two statements, sent unnamed (for PgBouncer), were
 * planned again for every batch. The rows are what the statements returned, by position: the
 * orders with their payment and age; their items in sku order, at most $2 per order. */
#define LOAD_ORDERS_SQL "SELECT * FROM settle_load_orders($1::text[])"
#define LOAD_ITEMS_SQL "SELECT * FROM settle_load_items($1::text[], $2::integer) ORDER BY 1, 2"
#define APPLY_OUTCOMES_SQL                                                                         \
    "SELECT o_i, o_changed, o_status, o_sqlstate, o_message "                                      \
    "FROM settle_apply_outcomes($1::jsonb)"
/* SET LOCAL statement_timeout = $1 ms, as a function so it can take a parameter. */
#define SET_TIMEOUT_SQL "SELECT set_config('statement_timeout', $1, true)"

/*
 * The statements every batch sends. Sent unnamed, each is parsed and planned again for every
 * batch (migrations 004 and 006 keep the plans of what runs inside the functions,
 * not of these calls). With SETTLE_DB_PREPARED each is prepared once per connection under its
 * name and then only bound and executed: measured ~18 us of PostgreSQL CPU per job less at 30
 * jobs per batch. Off by default because PgBouncer before 1.21 in transaction pooling hands a
 * client's statements to whichever server connection is free, where the name is unknown.
 */
enum hot_id { HOT_SET_TIMEOUT, HOT_LOAD_ORDERS, HOT_LOAD_ITEMS, HOT_APPLY_OUTCOMES, HOT_COUNT };

static const struct hot_stmt {
    const char *name;
    const char *sql;
    int n_params;
} hot_stmts[HOT_COUNT] = {
    [HOT_SET_TIMEOUT] = {"settle_set_timeout", SET_TIMEOUT_SQL, 1},
    [HOT_LOAD_ORDERS] = {"settle_load_orders", LOAD_ORDERS_SQL, 1},
    [HOT_LOAD_ITEMS] = {"settle_load_items", LOAD_ITEMS_SQL, 2},
    [HOT_APPLY_OUTCOMES] = {"settle_apply_outcomes", APPLY_OUTCOMES_SQL, 1},
};

struct store_slot {
    PGconn *conn;      /* NULL until first use and after a connection error */
    unsigned prepared; /* bit (1 << hot_id) per hot statement prepared on conn */
    bool busy;         /* borrowed by a thread */
};

struct store {
    char *conninfo;
    unsigned pool_size;
    bool prepared;              /* SETTLE_DB_PREPARED */
    char statement_timeout[24]; /* milliseconds, the unit set_config assumes */
    char connect_timeout[24];   /* whole seconds, at least 1 */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled whenever a slot is returned */
    struct store_slot *slots;
};

/* One borrowed connection and the caller's error buffer. */
struct session {
    struct store *s;
    struct store_slot *slot; /* NULL when nothing is borrowed */
    bool reused;             /* the connection served earlier work and may have died since */
    bool broken;             /* close the connection when the slot is returned */
    char *err;
    size_t err_len;
};

/* --- Text helpers ---------------------------------------------------------------------------- */

/* Copies src into dst (dst_size >= 1 bytes with the NUL), cutting at a UTF-8 character
 * boundary when it does not fit. Returns true when src was cut. */
static bool copy_text(char *dst, size_t dst_size, const char *src)
{
    size_t n = strlen(src);
    bool cut = false;

    if (n >= dst_size) {
        n = dst_size - 1;
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80)
            n--;
        cut = true;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
    return cut;
}

/* Writes prefix + msg into err as one line: libpq messages end in a newline and may span
 * several lines, and err goes into logs and the DLQ. */
static void err_set(char *err, size_t err_len, const char *prefix, const char *msg)
{
    size_t n, lead;

    if (err == NULL || err_len == 0)
        return;
    snprintf(err, err_len, "%s%s", prefix, msg != NULL ? msg : "");
    for (char *p = err; *p != '\0'; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    }
    n = strlen(err);
    /* snprintf may have cut a multi-byte character in half; drop the partial tail. */
    lead = n;
    while (lead > 0 && n - lead < 4 && ((unsigned char)err[lead - 1] & 0xC0) == 0x80)
        lead--;
    if (lead > 0 && (unsigned char)err[lead - 1] >= 0x80 &&
        text_utf8_seq_len((const unsigned char *)err + lead - 1, n - lead + 1) == 0)
        n = lead - 1;
    while (n > 0 && err[n - 1] == ' ')
        n--;
    err[n] = '\0';
}

/*
 * A copy of free text that came from outside (gateway reasons, error texts, card types) fit
 * for a text column: invalid UTF-8 bytes become '?', so PostgreSQL cannot refuse the whole
 * outcome over one bad byte, and card numbers are masked, so a PAN echoed by a gateway never
 * reaches the database. NULL in, NULL out; *oom set when the copy could not be made.
 */
static char *text_dup_clean(const char *src, bool *oom)
{
    size_t len, i = 0;
    char *dst;

    if (src == NULL)
        return NULL;
    len = strlen(src);
    dst = malloc(len + 1);
    if (dst == NULL) {
        *oom = true;
        return NULL;
    }
    while (i < len) {
        size_t n = text_utf8_seq_len((const unsigned char *)src + i, len - i);
        if (n == 0) {
            dst[i++] = '?';
            continue;
        }
        memcpy(dst + i, src + i, n);
        i += n;
    }
    dst[len] = '\0';
    log_mask_cards(dst, len);
    return dst;
}

/*
 * A PostgreSQL array literal ({"a","b",NULL}) of n values for an ANY() or unnest()
 * parameter: NULL entries become SQL NULLs, '"' and '\' are escaped, and bytes that are not
 * valid UTF-8 become '?', so one odd value cannot make PostgreSQL refuse a whole batch.
 * malloc'd; NULL on allocation failure.
 */
static char *array_literal(const char *const *v, size_t n)
{
    size_t cap = 3;
    for (size_t i = 0; i < n; i++)
        cap += v[i] != NULL ? 2 * strlen(v[i]) + 3 : 5;
    char *out = malloc(cap);
    if (out == NULL)
        return NULL;
    size_t o = 0;
    out[o++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            out[o++] = ',';
        if (v[i] == NULL) {
            memcpy(out + o, "NULL", 4);
            o += 4;
            continue;
        }
        out[o++] = '"';
        size_t len = strlen(v[i]);
        for (size_t k = 0; k < len;) {
            size_t sl = text_utf8_seq_len((const unsigned char *)v[i] + k, len - k);
            if (sl == 0) {
                out[o++] = '?';
                k++;
                continue;
            }
            if (sl == 1 && (v[i][k] == '"' || v[i][k] == '\\'))
                out[o++] = '\\';
            memcpy(out + o, v[i] + k, sl);
            o += sl;
            k += sl;
        }
        out[o++] = '"';
    }
    out[o++] = '}';
    out[o] = '\0';
    return out;
}

/* Parses a decimal integer PostgreSQL returned; SETTLE_EPARSE when it is not one. */
static int parse_i64(const char *text, int64_t *out)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0')
        return SETTLE_EPARSE;
    *out = v;
    return 0;
}

/* --- Errors ------------------------------------------------------------------------------------
 */

/*
 * Maps a SQLSTATE to the caller's error and says whether the connection must be dropped.
 * Transient (retry later): connection exceptions (08), server shutdown or restart (57P01..03)
 * and idle-session kills (57P05), insufficient resources (53), serialization failures and
 * deadlocks (40001, 40P01), statement timeout or cancel (57014), lock timeout (55P03), and a
 * read-only transaction (25006: we reached a standby, e.g. during failover; a new connection
 * may find the new primary), and, with SETTLE_DB_PREPARED, a prepared statement the server
 * does not have or already has (26000, 42P05: a pooler moved us to another server connection;
 * a new connection prepares its own). Everything else, constraint violations (23) included, is
 * permanent.
 */
static int sqlstate_classify(const char *state, bool *drop)
{
    *drop = false;
    if (strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0 ||
        strcmp(state, "57P02") == 0 || strcmp(state, "57P03") == 0 || strcmp(state, "57P05") == 0 ||
        strcmp(state, "25006") == 0 || strcmp(state, "26000") == 0 || strcmp(state, "42P05") == 0) {
        *drop = true;
        return SETTLE_EUNAVAILABLE;
    }
    if (strncmp(state, "53", 2) == 0 || strcmp(state, "40001") == 0 ||
        strcmp(state, "40P01") == 0 || strcmp(state, "57014") == 0 || strcmp(state, "55P03") == 0)
        return SETTLE_EUNAVAILABLE;
    return SETTLE_EREJECTED;
}

/* 0 when res is a success (or, with allow_empty, an empty query); otherwise maps the error
 * into ss->err, marks the connection broken when it is, and returns the error. */
static int result_check(struct session *ss, const PGresult *res, bool allow_empty)
{
    PGconn *conn = ss->slot->conn;
    ExecStatusType st = res != NULL ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    const char *state, *msg;
    char prefix[32];
    bool drop;
    int rc;

    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || (allow_empty && st == PGRES_EMPTY_QUERY))
        return 0;
    state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (state == NULL) {
        /* No SQLSTATE: libpq itself failed (connection lost, out of memory, protocol). */
        msg = res != NULL ? PQresultErrorMessage(res) : "";
        if (msg[0] == '\0')
            msg = PQerrorMessage(conn);
        err_set(ss->err, ss->err_len, "postgresql: ", msg);
        ss->broken = true;
        return SETTLE_EUNAVAILABLE;
    }
    rc = sqlstate_classify(state, &drop);
    if (drop || PQstatus(conn) != CONNECTION_OK) {
        ss->broken = true;
        rc = SETTLE_EUNAVAILABLE;
    }
    msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    snprintf(prefix, sizeof(prefix), "SQLSTATE %.5s: ", state);
    err_set(ss->err, ss->err_len, prefix, msg);
    return rc;
}

/* Runs one parameterised statement. On success *out (when not NULL) receives the result,
 * which the caller clears. */
static int exec_params(struct session *ss, const char *sql, int n_params, const char *const *params,
                       PGresult **out)
{
    PGresult *res = PQexecParams(ss->slot->conn, sql, n_params, NULL, params, NULL, NULL, 0);
    int rc = result_check(ss, res, false);

    if (rc == 0 && out != NULL) {
        *out = res;
        res = NULL;
    }
    PQclear(res);
    return rc;
}

/*
 * With SETTLE_DB_PREPARED, prepares each of the n hot statements the connection does not have
 * yet (one round trip each, once per connection). Called outside any transaction: PostgreSQL
 * keeps a prepared statement for the whole session whatever later transactions do, and the
 * slot forgets its bits only with its connection (slot_connect).
 */
static int hot_prepare(struct session *ss, const enum hot_id *ids, int n)
{
    struct store_slot *slot = ss->slot;

    if (!ss->s->prepared)
        return 0;
    for (int i = 0; i < n; i++) {
        const struct hot_stmt *h = &hot_stmts[ids[i]];
        unsigned bit = 1u << ids[i];
        if ((slot->prepared & bit) != 0)
            continue;
        PGresult *res = PQprepare(slot->conn, h->name, h->sql, h->n_params, NULL);
        int rc = result_check(ss, res, false);
        PQclear(res);
        if (rc != 0)
            return rc;
        slot->prepared |= bit;
    }
    return 0;
}

/* Sends a hot statement (pipeline mode) by name when prepared, as text otherwise; 1 on success,
 * as libpq's PQsend* return. */
static int hot_send(struct session *ss, enum hot_id id, const char *const *params)
{
    const struct hot_stmt *h = &hot_stmts[id];

    if (ss->s->prepared)
        return PQsendQueryPrepared(ss->slot->conn, h->name, h->n_params, params, NULL, NULL, 0);
    return PQsendQueryParams(ss->slot->conn, h->sql, h->n_params, NULL, params, NULL, NULL, 0);
}

/* Runs a hot statement outside a pipeline, by name when prepared; exec_params' contract
 * without a result. */
static int hot_exec(struct session *ss, enum hot_id id, const char *const *params)
{
    const struct hot_stmt *h = &hot_stmts[id];
    PGresult *res =
        ss->s->prepared
            ? PQexecPrepared(ss->slot->conn, h->name, h->n_params, params, NULL, NULL, 0)
            : PQexecParams(ss->slot->conn, h->sql, h->n_params, NULL, params, NULL, NULL, 0);
    int rc = result_check(ss, res, false);

    PQclear(res);
    return rc;
}

/* Runs one parameterised write; *rows receives how many rows it changed. */
static int exec_count(struct session *ss, const char *sql, int n_params, const char *const *params,
                      int64_t *rows)
{
    PGresult *res = NULL;
    int rc = exec_params(ss, sql, n_params, params, &res);

    if (rc == 0 && parse_i64(PQcmdTuples(res), rows) != 0) {
        err_set(ss->err, ss->err_len, "postgresql: ", "no row count in the command status");
        rc = SETTLE_EINTERNAL;
    }
    PQclear(res);
    return rc;
}

/* --- Pool --------------------------------------------------------------------------------------
 */

/* PostgreSQL notices and warnings (e.g. from a migration) go to the log, not to stderr. */
static void on_pg_notice(void *arg, const PGresult *res)
{
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    enum log_level level = LOG_LEVEL_INFO;

    if (sev != NULL && strcmp(sev, "WARNING") == 0)
        level = LOG_LEVEL_WARN;
    else if (sev != NULL && (strcmp(sev, "DEBUG") == 0 || strcmp(sev, "LOG") == 0))
        level = LOG_LEVEL_DEBUG;
    log_write(level, NULL, NULL, "postgresql %s (SQLSTATE %s): %s", sev != NULL ? sev : "NOTICE",
              state != NULL ? state : "?", msg != NULL ? msg : "");
}

/* Opens the borrowed slot's connection. The conninfo may be a URI or key=value text
 * (expand_dbname); it may set its own application_name, but connect_timeout comes from the
 * configuration and the client encoding is always UTF-8, which is what every string we
 * send is. The error text is libpq's, which names the host and port but never the
 * conninfo itself (it may hold a password). */
static int slot_connect(struct session *ss)
{
    static const char *const keys[] = {"application_name", "dbname", "connect_timeout",
                                       "client_encoding", NULL};
    const char *values[] = {"settle", ss->s->conninfo, ss->s->connect_timeout, "UTF8", NULL};
    PGconn *conn = PQconnectdbParams(keys, values, 1);
    int rc = 0;

    if (conn == NULL) {
        err_set(ss->err, ss->err_len, "postgresql connect: ", "out of memory");
        rc = SETTLE_EUNAVAILABLE;
        goto out;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        err_set(ss->err, ss->err_len, "postgresql connect: ", PQerrorMessage(conn));
        PQfinish(conn);
        rc = SETTLE_EUNAVAILABLE;
        goto out;
    }
    PQsetNoticeReceiver(conn, on_pg_notice, NULL);
    ss->slot->conn = conn;
    ss->slot->prepared = 0;
out:
    return rc;
}

/* Returns the slot: an abandoned transaction is rolled back, a broken connection closed (the
 * next borrower reconnects), and one waiting thread is woken. No-op when nothing is held. */
static void session_close(struct session *ss)
{
    struct store_slot *slot = ss->slot;
    PGconn *conn;

    if (slot == NULL)
        return;
    conn = slot->conn;
    if (conn != NULL && !ss->broken) {
        PGTransactionStatusType ts = PQtransactionStatus(conn);
        if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
            /* ROLLBACK: ends the transaction an error abandoned. */
            PGresult *res = PQexecParams(conn, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0);
            if (res == NULL || PQresultStatus(res) != PGRES_COMMAND_OK)
                ss->broken = true;
            PQclear(res);
            ts = PQtransactionStatus(conn);
        }
        if (ts != PQTRANS_IDLE)
            ss->broken = true;
    }
    if (conn != NULL && (ss->broken || PQstatus(conn) != CONNECTION_OK)) {
        PQfinish(conn);
        slot->conn = NULL;
    }
    pthread_mutex_lock(&ss->s->mu);
    slot->busy = false;
    pthread_cond_signal(&ss->s->cv);
    pthread_mutex_unlock(&ss->s->mu);
    ss->slot = NULL;
}

/* Borrows a slot, waiting while all are busy, and makes sure it has an open connection. On
 * failure nothing stays borrowed. session_close is safe either way. */
static int session_open(struct store *s, struct session *ss, char *err, size_t err_len)
{
    struct store_slot *slot = NULL;
    int rc = 0;

    memset(ss, 0, sizeof(*ss));
    ss->s = s;
    ss->err = err;
    ss->err_len = err_len;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        /* Prefer a free slot that is already connected over opening a new connection. */
        for (unsigned i = 0; i < s->pool_size; i++) {
            if (!s->slots[i].busy && (slot == NULL || s->slots[i].conn != NULL)) {
                slot = &s->slots[i];
                if (slot->conn != NULL)
                    break;
            }
        }
        if (slot != NULL)
            break;
        pthread_cond_wait(&s->cv, &s->mu);
    }
    slot->busy = true;
    pthread_mutex_unlock(&s->mu);

    ss->slot = slot;
    if (slot->conn != NULL && PQstatus(slot->conn) == CONNECTION_OK) {
        ss->reused = true;
        goto out;
    }
    if (slot->conn != NULL) {
        PQfinish(slot->conn);
        slot->conn = NULL;
    }
    rc = slot_connect(ss);
    if (rc != 0)
        session_close(ss);
out:
    return rc;
}

/* A pooled connection can die while idle (server restart, failover, idle timeout). When a
 * transaction failed on one before anything ran, this replaces it with a fresh connection so
 * the caller can try once more. */
static int session_reconnect(struct session *ss)
{
    PQfinish(ss->slot->conn);
    ss->slot->conn = NULL;
    ss->broken = false;
    ss->reused = false;
    return slot_connect(ss);
}

/* Prepares the statement_timeout statement if needed, then BEGIN. */
static int tx_open(struct session *ss, const char *begin_sql)
{
    static const enum hot_id ids[1] = {HOT_SET_TIMEOUT};
    int rc = hot_prepare(ss, ids, 1);

    /* BEGIN: opens the transaction. */
    return rc != 0 ? rc : exec_params(ss, begin_sql, 0, NULL, NULL);
}

/* Opens a transaction (begin_sql) with the configured statement_timeout. */
static int tx_begin(struct session *ss, const char *begin_sql)
{
    const char *params[1] = {ss->s->statement_timeout};
    int rc;

    rc = tx_open(ss, begin_sql);
    if (rc != 0 && ss->broken && ss->reused) {
        /* Nothing has been done yet: one fresh connection is tried before giving up. */
        rc = session_reconnect(ss);
        if (rc == 0)
            rc = tx_open(ss, begin_sql);
    }
    /* SET LOCAL statement_timeout = $1 ms. */
    return rc != 0 ? rc : hot_exec(ss, HOT_SET_TIMEOUT, params);
}

/* Borrows a connection and opens a transaction (begin_sql, with the statement timeout) on it.
 * The caller calls session_close either way. */
static int session_begin(struct store *s, struct session *ss, const char *begin_sql, char *err,
                         size_t err_len)
{
    int rc = session_open(s, ss, err, err_len);

    return rc != 0 ? rc : tx_begin(ss, begin_sql);
}

/* Most statements in one pipelined transaction besides BEGIN, the timeout and COMMIT. */
#define STORE_PIPE_MAX 3

/* One statement of a pipelined transaction (tx_pipeline): a hot statement and its
 * hot_stmts[id].n_params parameters. */
struct pipe_stmt {
    enum hot_id id;
    const char *const *params;
    PGresult *res; /* out: the statement's result, kept for the caller (who clears it) */
};

/* One flight of tx_pipeline; *failed_at is the index (0 = BEGIN) of the statement that failed. */
static int pipeline_once(struct session *ss, const char *begin_sql, struct pipe_stmt *st, int n,
                         int *failed_at)
{
    PGconn *conn = ss->slot->conn;
    const char *timeout[1] = {ss->s->statement_timeout};
    enum hot_id ids[STORE_PIPE_MAX + 1] = {HOT_SET_TIMEOUT};
    int total = n + 3, idx = 0, rc = 0;
    bool synced = false;

    /* Until BEGIN is sent, a failure means nothing of the transaction ran. */
    *failed_at = 0;
    if (n < 0 || n > STORE_PIPE_MAX)
        return SETTLE_EINVAL;
    for (int i = 0; i < n; i++)
        ids[i + 1] = st[i].id;
    rc = hot_prepare(ss, ids, n + 1);
    if (rc != 0)
        return rc;
    *failed_at = -1;
    if (PQenterPipelineMode(conn) != 1) {
        err_set(ss->err, ss->err_len, "postgresql: ", PQerrorMessage(conn));
        ss->broken = true;
        *failed_at = 0;
        return SETTLE_EUNAVAILABLE;
    }
    /* BEGIN, SET LOCAL statement_timeout (as a function, so it takes a parameter), the
     * statements, COMMIT, and the Sync that ends the pipeline. */
    bool sent = PQsendQueryParams(conn, begin_sql, 0, NULL, NULL, NULL, NULL, 0) == 1 &&
                hot_send(ss, HOT_SET_TIMEOUT, timeout) == 1;
    for (int i = 0; i < n && sent; i++)
        sent = hot_send(ss, st[i].id, st[i].params) == 1;
    sent = sent && PQsendQueryParams(conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) == 1 &&
           PQpipelineSync(conn) == 1;
    if (!sent) {
        err_set(ss->err, ss->err_len, "postgresql: ", PQerrorMessage(conn));
        ss->broken = true;
        *failed_at = 0;
        return SETTLE_EUNAVAILABLE;
    }
    /* Each statement's results end with a NULL; after an error the rest come back
     * PGRES_PIPELINE_ABORTED; the Sync's result ends the flight. Bounded: a lost connection
     * returns NULLs for ever. */
    for (int guard = 0; guard < 4 * (total + 2) && !synced; guard++) {
        PGresult *res = PQgetResult(conn);
        if (res == NULL) {
            if (PQstatus(conn) != CONNECTION_OK)
                break;
            idx++;
            continue;
        }
        ExecStatusType est = PQresultStatus(res);
        if (est == PGRES_PIPELINE_SYNC) {
            synced = true;
        } else if (est != PGRES_PIPELINE_ABORTED && rc == 0 && idx < total) {
            rc = result_check(ss, res, false);
            if (rc != 0) {
                *failed_at = idx;
            } else if (idx == total - 1 && strcmp(PQcmdStatus(res), "COMMIT") != 0) {
                err_set(ss->err, ss->err_len, "postgresql: ", "transaction rolled back at COMMIT");
                rc = SETTLE_EINTERNAL;
                *failed_at = idx;
            } else if (idx >= 2 && idx < n + 2) {
                st[idx - 2].res = res;
                res = NULL;
            }
        }
        PQclear(res);
    }
    if (!synced || PQexitPipelineMode(conn) != 1) {
        if (rc == 0) {
            err_set(ss->err, ss->err_len, "postgresql: ", PQerrorMessage(conn));
            rc = SETTLE_EUNAVAILABLE;
            *failed_at = idx;
        }
        ss->broken = true;
    }
    return rc;
}

/*
 * Runs a whole transaction - begin_sql, the statement_timeout, the n statements, COMMIT - as
 * one libpq pipeline: one network flight instead of n + 3 round trips. st[i].res receives
 * each statement's result (the caller clears them, also on failure). A connection that died
 * while pooled is replaced once when nothing ran on it yet (the failure is at BEGIN); a COMMIT
 * whose answer was lost is SETTLE_EUNAVAILABLE, and retrying is safe because every write here
 * is idempotent.
 */
static int tx_pipeline(struct session *ss, const char *begin_sql, struct pipe_stmt *st, int n)
{
    int failed_at = -1;
    int rc = pipeline_once(ss, begin_sql, st, n, &failed_at);

    if (rc != 0 && ss->broken && ss->reused && failed_at == 0) {
        for (int i = 0; i < n; i++) {
            PQclear(st[i].res);
            st[i].res = NULL;
        }
        rc = session_reconnect(ss);
        if (rc == 0)
            rc = pipeline_once(ss, begin_sql, st, n, &failed_at);
    }
    return rc;
}

/* Commits. If the connection dies during COMMIT the outcome is unknown and we report
 * SETTLE_EUNAVAILABLE; retrying is safe because every write here is idempotent. */
static int tx_commit(struct session *ss)
{
    PGresult *res = NULL;
    int rc;

    /* COMMIT: makes the transaction's writes durable. */
    rc = exec_params(ss, "COMMIT", 0, NULL, &res);
    if (rc == 0 && strcmp(PQcmdStatus(res), "COMMIT") != 0) {
        /* The server answers ROLLBACK to the COMMIT of a failed transaction; every error is
         * caught before we get here, so this is a bug. */
        err_set(ss->err, ss->err_len, "postgresql: ", "transaction rolled back at COMMIT");
        rc = SETTLE_EINTERNAL;
    }
    PQclear(res);
    return rc;
}

int store_create(struct store **out, const struct store_config *cfg)
{
    struct store *s = NULL;
    uint64_t connect_s;
    bool mu_ok = false;
    int rc = 0;

    if (out == NULL || cfg == NULL || cfg->conninfo == NULL || cfg->pool_size == 0) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    *out = NULL;
    /* Reject malformed key=value or URI text now, without echoing any of it (it may hold a
     * password). Like libpq, treat it as a connection string only when it looks like one;
     * anything else is a database name. */
    if (strchr(cfg->conninfo, '=') != NULL || strncmp(cfg->conninfo, "postgresql://", 13) == 0 ||
        strncmp(cfg->conninfo, "postgres://", 11) == 0) {
        char *perr = NULL;
        PQconninfoOption *opts = PQconninfoParse(cfg->conninfo, &perr);
        PQfreemem(perr);
        if (opts == NULL) {
            rc = SETTLE_EINVAL;
            goto out;
        }
        PQconninfoFree(opts);
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    s->pool_size = cfg->pool_size;
    s->prepared = cfg->prepared;
    s->conninfo = strdup(cfg->conninfo);
    s->slots = calloc(cfg->pool_size, sizeof(*s->slots));
    if (s->conninfo == NULL || s->slots == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    snprintf(s->statement_timeout, sizeof(s->statement_timeout), "%" PRIu64,
             cfg->statement_timeout_ms);
    connect_s = cfg->connect_timeout_ms / 1000 + (cfg->connect_timeout_ms % 1000 != 0);
    if (connect_s < 1)
        connect_s = 1;
    snprintf(s->connect_timeout, sizeof(s->connect_timeout), "%" PRIu64, connect_s);
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    mu_ok = true;
    if (pthread_cond_init(&s->cv, NULL) != 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    *out = s;
    s = NULL;
out:
    if (s != NULL) {
        if (mu_ok)
            pthread_mutex_destroy(&s->mu);
        free(s->slots);
        free(s->conninfo);
        free(s);
    }
    return rc;
}

void store_destroy(struct store *s)
{
    if (s == NULL)
        return;
    for (unsigned i = 0; i < s->pool_size; i++) {
        if (s->slots[i].busy) {
            fprintf(stderr, "%s:%d: store_destroy while a connection is borrowed\n", __FILE__,
                    __LINE__);
            abort();
        }
        PQfinish(s->slots[i].conn);
    }
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s->slots);
    free(s->conninfo);
    free(s);
}

/* --- Migrations --------------------------------------------------------------------------------
 */

/* The version a migration file name starts with ("001_init.sql" -> 1); -1 when none. */
static long migration_version(const char *name)
{
    char *end;
    long v;

    if (name[0] < '0' || name[0] > '9')
        return -1;
    errno = 0;
    v = strtol(name, &end, 10);
    if (errno != 0 || end == name || v > INT_MAX)
        return -1;
    return v;
}

/* Creates schema_migrations when missing, under the migration lock so concurrent first
 * starts do not race on CREATE TABLE. */
static int migrations_table_ensure(struct session *ss)
{
    PGresult *res = NULL;
    int rc;

    rc = tx_begin(ss, BEGIN_SQL);
    if (rc != 0)
        goto out;
    /* Waits for the migration lock (released at the end of the transaction). */
    rc = exec_params(ss, MIGRATE_LOCK_SQL, 0, NULL, NULL);
    if (rc != 0)
        goto out;
    /* Does schema_migrations exist (in the search_path)? */
    rc = exec_params(ss, "SELECT to_regclass('schema_migrations') IS NULL", 0, NULL, &res);
    if (rc != 0)
        goto out;
    if (strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
        /* Creates the table that records applied migration versions. */
        rc = exec_params(ss,
                         "CREATE TABLE schema_migrations ("
                         "version integer PRIMARY KEY, name text, "
                         "applied_at timestamptz DEFAULT now())",
                         0, NULL, NULL);
        if (rc != 0)
            goto out;
    }
    rc = tx_commit(ss);
out:
    PQclear(res);
    return rc;
}

/* Applies one migration unless its version is recorded; *ran says whether it did. */
static int migration_apply(struct session *ss, const struct embedded_file *f, long version,
                           bool *ran)
{
    char version_text[24];
    const char *params[2] = {version_text, f->name};
    PGresult *res = NULL;
    int rc;

    *ran = false;
    snprintf(version_text, sizeof(version_text), "%ld", version);
    rc = tx_begin(ss, BEGIN_SQL);
    if (rc != 0)
        goto out;
    /* Waits for the migration lock, so the check below and the apply are atomic. */
    rc = exec_params(ss, MIGRATE_LOCK_SQL, 0, NULL, NULL);
    if (rc != 0)
        goto out;
    /* Is this version already applied? */
    rc = exec_params(ss, "SELECT 1 FROM schema_migrations WHERE version = $1::integer", 1, params,
                     &res);
    if (rc != 0 || PQntuples(res) > 0)
        goto commit;
    /* Runs the migration's statements. PQexec with unparameterised text is right here and
     * nowhere else: the text is our own migration shipped in the binary, and a migration is
     * several statements, which only the simple query protocol accepts. */
    PQclear(res);
    res = PQexec(ss->slot->conn, f->data);
    rc = result_check(ss, res, true);
    if (rc != 0) {
        char prefix[STORE_ERR_MAX];
        char detail[STORE_ERR_MAX];
        copy_text(detail, sizeof(detail), ss->err != NULL ? ss->err : "");
        snprintf(prefix, sizeof(prefix), "migration %s: ", f->name);
        err_set(ss->err, ss->err_len, prefix, detail);
        goto out;
    }
    /* Records the version as applied. */
    rc = exec_params(ss, "INSERT INTO schema_migrations (version, name) VALUES ($1::integer, $2)",
                     2, params, NULL);
    if (rc != 0)
        goto out;
    *ran = true;
commit:
    if (rc == 0)
        rc = tx_commit(ss);
    if (rc == 0 && *ran)
        log_info("applied migration %s", f->name);
    if (rc != 0)
        *ran = false;
out:
    PQclear(res);
    return rc;
}

int store_migrate(struct store *s, unsigned *applied, char *err, size_t err_len)
{
    struct session ss = {0};
    unsigned n = 0;
    long prev = -1;
    int rc = 0;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    /* A bad or duplicate version is a build error that would otherwise skip a file. */
    for (const struct embedded_file *f = embedded_sql; f->name != NULL; f++) {
        long v = migration_version(f->name);
        if (v < 0 || v <= prev) {
            err_set(err, err_len,
                    "migration file name needs a unique, increasing version: ", f->name);
            rc = SETTLE_EINVAL;
            goto out;
        }
        prev = v;
    }
    rc = session_open(s, &ss, err, err_len);
    if (rc != 0)
        goto out;
    rc = migrations_table_ensure(&ss);
    if (rc != 0)
        goto out;
    for (const struct embedded_file *f = embedded_sql; f->name != NULL; f++) {
        bool ran;
        rc = migration_apply(&ss, f, migration_version(f->name), &ran);
        if (rc != 0)
            goto out;
        n += ran;
    }
out:
    session_close(&ss);
    if (applied != NULL)
        *applied = n;
    return rc;
}

/* --- Reads -------------------------------------------------------------------------------------
 */

int store_ping_work(struct store *s, char *err, size_t err_len)
{
    struct session ss = {0};
    int rc;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Round trip through the server. */
    rc = exec_params(&ss, "SELECT 1", 0, NULL, NULL);
    if (rc != 0)
        goto out;
    rc = tx_commit(&ss);
out:
    session_close(&ss);
    return rc;
}

int store_warm_work(struct store *s, unsigned n, char *err, size_t err_len)
{
    struct session ss[STORE_WARM_MAX];
    const char *params[2] = {"{}", "1"};
    const char *empty[1] = {"[]"};
    unsigned open = 0;
    int rc = 0;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL || n == 0)
        return SETTLE_EINVAL;
    if (n > STORE_WARM_MAX)
        n = STORE_WARM_MAX;
    if (n > s->pool_size)
        n = s->pool_size;
    /* All n held at once, so they are n different connections. One thread holds them, and
     * nothing else holds more than one, so waiting for a slot here cannot deadlock. */
    for (; open < n && rc == 0; open++)
        rc = session_open(s, &ss[open], err, err_len);
    if (rc != 0)
        open--; /* the failed one returned its slot */
    for (unsigned i = 0; i < open && rc == 0; i++) {
        /* An order load and an outcome batch with nothing in them: the statements are
         * parsed, the function compiled and its plans made, and nothing is written. */
        struct pipe_stmt st[3] = {{.id = HOT_LOAD_ORDERS, .params = params},
                                  {.id = HOT_LOAD_ITEMS, .params = params},
                                  {.id = HOT_APPLY_OUTCOMES, .params = empty}};
        rc = tx_pipeline(&ss[i], BEGIN_SQL, st, 3);
        for (int k = 0; k < 3; k++)
            PQclear(st[k].res);
    }
    for (unsigned i = 0; i < open; i++)
        session_close(&ss[i]);
    return rc;
}

/* Copies an identifier PostgreSQL returned; one that does not fit cannot be used at all, so
 * it is an error rather than a silent cut. */
static int copy_id(struct session *ss, char *dst, size_t dst_size, const char *src,
                   const char *what)
{
    if (strlen(src) >= dst_size) {
        err_set(ss->err, ss->err_len, what, " is longer than settle accepts");
        return SETTLE_ETOOBIG;
    }
    memcpy(dst, src, strlen(src) + 1);
    return 0;
}

/* Fills out from row `row` of the orders + payments result (columns as in
 * store_load_orders_work). */
static int order_row_read(struct session *ss, const PGresult *res, int row, struct store_order *out)
{
    int64_t amount, refunded, age, checks;
    int rc;

    rc = copy_id(ss, out->id, sizeof(out->id), PQgetvalue(res, row, 0), "orders.id");
    if (rc == 0)
        rc = copy_id(ss, out->user_id, sizeof(out->user_id), PQgetvalue(res, row, 1),
                     "orders.user_id");
    if (rc == 0)
        rc =
            copy_id(ss, out->status, sizeof(out->status), PQgetvalue(res, row, 2), "orders.status");
    if (rc == 0)
        rc = copy_id(ss, out->transaction_key, sizeof(out->transaction_key),
                     PQgetvalue(res, row, 8), "payments.transaction_key");
    if (rc == 0)
        rc = copy_id(ss, out->payment_status, sizeof(out->payment_status), PQgetvalue(res, row, 9),
                     "payments.status");
    if (rc != 0)
        goto out;
    /* The reason is prose for people: cutting it is fine. */
    copy_text(out->failure_reason, sizeof(out->failure_reason), PQgetvalue(res, row, 3));
    if (parse_i64(PQgetvalue(res, row, 4), &amount) != 0 ||
        parse_i64(PQgetvalue(res, row, 5), &refunded) != 0 ||
        parse_i64(PQgetvalue(res, row, 6), &age) != 0 ||
        parse_i64(PQgetvalue(res, row, 7), &checks) != 0 || age < 0 || checks < 0 ||
        (uint64_t)checks > UINT_MAX) {
        err_set(ss->err, ss->err_len, "postgresql: ", "unexpected number in the orders row");
        rc = SETTLE_EPARSE;
        goto out;
    }
    out->amount_minor = amount;
    out->refunded_minor = refunded;
    out->age_ms = (uint64_t)age;
    out->check_count = (unsigned)checks;
out:
    return rc;
}

/* While a batch runs, an entry's status holds one of these (positive, so never an error or
 * 0); every entry leaves the batch with 0 or a negative error. */
enum {
    BATCH_WAITING = 1,  /* sent, no answer yet */
    BATCH_ANSWERED = 2, /* answered (a load: its order row read, items next; an outcome:
                         * applied), final once the transaction ends well */
};

/* Gives every load of the batch that has no final answer yet the status rc and the text err. */
static void loads_fail(struct store_load *l, size_t n, int rc, const char *err)
{
    for (size_t i = 0; i < n; i++) {
        if (l[i].status != BATCH_WAITING && l[i].status != BATCH_ANSWERED)
            continue;
        l[i].status = rc;
        copy_text(l[i].err, sizeof(l[i].err), err);
    }
}

/* Reads one orders + payments row into every load of that order (a batch may hold two jobs
 * of one order). A bad row fails only its own loads. */
static void loads_place_order(struct session *ss, const PGresult *res, int row,
                              struct store_load *l, size_t n)
{
    const char *id = PQgetvalue(res, row, 0);
    for (size_t i = 0; i < n; i++) {
        if (l[i].status != BATCH_WAITING || strcmp(l[i].order_id, id) != 0)
            continue;
        ss->err = l[i].err;
        ss->err_len = sizeof(l[i].err);
        memset(l[i].order, 0, sizeof(*l[i].order));
        int rc = order_row_read(ss, res, row, l[i].order);
        l[i].status = rc == 0 ? BATCH_ANSWERED : rc;
    }
}

/* Adds one order_items row to every load of its order. */
static void loads_place_item(struct session *ss, const PGresult *res, int row, struct store_load *l,
                             size_t n)
{
    const char *id = PQgetvalue(res, row, 0);
    for (size_t i = 0; i < n; i++) {
        struct store_order *o = l[i].order;
        int64_t qty;
        if (l[i].status != BATCH_ANSWERED || strcmp(l[i].order_id, id) != 0)
            continue;
        ss->err = l[i].err;
        ss->err_len = sizeof(l[i].err);
        if (o->n_items >= STORE_ITEMS_MAX) {
            err_set(ss->err, ss->err_len, "order has more items than settle accepts", "");
            l[i].status = SETTLE_ETOOBIG;
            continue;
        }
        int rc = copy_id(ss, o->items[o->n_items].sku, sizeof(o->items[o->n_items].sku),
                         PQgetvalue(res, row, 1), "order_items.sku");
        if (rc == 0 &&
            (parse_i64(PQgetvalue(res, row, 2), &qty) != 0 || qty <= 0 || qty > INT32_MAX)) {
            err_set(ss->err, ss->err_len, "postgresql: ", "unexpected order_items.qty");
            rc = SETTLE_EPARSE;
        }
        if (rc != 0) {
            l[i].status = rc;
            continue;
        }
        o->items[o->n_items++].qty = (int32_t)qty;
    }
}

int store_load_orders_work(struct store *s, struct store_load *l, size_t n)
{
    char limit[16], err[STORE_ERR_MAX] = "";
    const char *ids[STORE_BATCH_MAX];
    const char *params[2] = {NULL, limit};
    struct session ss = {0};
    struct pipe_stmt st[2] = {{0}};
    char *id_array = NULL;
    int rc;

    if (s == NULL || l == NULL || n == 0 || n > STORE_BATCH_MAX)
        return SETTLE_EINVAL;
    for (size_t i = 0; i < n; i++) {
        l[i].err[0] = '\0';
        l[i].status = BATCH_WAITING;
        if (l[i].order_id == NULL || l[i].order_id[0] == '\0' || l[i].order == NULL) {
            l[i].status = SETTLE_EINVAL;
            copy_text(l[i].err, sizeof(l[i].err), "no order id");
        }
        ids[i] = l[i].order_id;
    }
    id_array = array_literal(ids, n);
    if (id_array == NULL) {
        rc = SETTLE_ENOMEM;
        copy_text(err, sizeof(err), settle_strerror(rc));
        goto out;
    }
    params[0] = id_array;
    /* One more item per order than we accept, so "too many" shows without reading them all. */
    snprintf(limit, sizeof(limit), "%d", STORE_ITEMS_MAX + 1);
    rc = session_open(s, &ss, err, sizeof(err));
    if (rc != 0)
        goto out;
    /* The orders with their payments (if any), the age computed by the server; then their
     * items in sku order, at most STORE_ITEMS_MAX + 1 per order. One read-only snapshot. */
    st[0] = (struct pipe_stmt){.id = HOT_LOAD_ORDERS, .params = params};
    st[1] = (struct pipe_stmt){.id = HOT_LOAD_ITEMS, .params = params};
    rc = tx_pipeline(&ss, BEGIN_READ_SQL, st, 2);
    if (rc != 0)
        goto out;
    for (int row = 0; row < PQntuples(st[0].res); row++)
        loads_place_order(&ss, st[0].res, row, l, n);
    for (int row = 0; row < PQntuples(st[1].res); row++)
        loads_place_item(&ss, st[1].res, row, l, n);
    ss.err = err;
    ss.err_len = sizeof(err);
out:
    if (rc != 0)
        loads_fail(l, n, rc, err);
    for (size_t i = 0; i < n; i++) {
        if (l[i].status == BATCH_WAITING) {
            l[i].status = SETTLE_ENOTFOUND;
            copy_text(l[i].err, sizeof(l[i].err), "order not found");
        } else if (l[i].status == BATCH_ANSWERED) {
            l[i].status = 0;
        }
    }
    free(id_array);
    PQclear(st[0].res);
    PQclear(st[1].res);
    session_close(&ss);
    return rc;
}

int store_list_products(struct store *s, struct store_product **out, size_t *n, char *err,
                        size_t err_len)
{
    struct session ss = {0};
    struct store_product *list = NULL;
    PGresult *res = NULL;
    int rows = 0, rc;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL || out == NULL || n == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    *out = NULL;
    *n = 0;
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Every product's on-hand stock, in sku order. */
    rc = exec_params(&ss, "SELECT sku, stock FROM products ORDER BY sku", 0, NULL, &res);
    if (rc != 0)
        goto out;
    rows = PQntuples(res);
    if (rows > 0) {
        list = calloc((size_t)rows, sizeof(*list));
        if (list == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
    }
    for (int i = 0; i < rows; i++) {
        rc = copy_id(&ss, list[i].sku, sizeof(list[i].sku), PQgetvalue(res, i, 0), "products.sku");
        if (rc != 0)
            goto out;
        if (parse_i64(PQgetvalue(res, i, 1), &list[i].on_hand) != 0) {
            err_set(err, err_len, "postgresql: ", "unexpected products.stock");
            rc = SETTLE_EPARSE;
            goto out;
        }
    }
    rc = tx_commit(&ss);
    if (rc != 0)
        goto out;
    *out = list;
    *n = (size_t)rows;
    list = NULL;
out:
    free(list);
    PQclear(res);
    session_close(&ss);
    return rc;
}

/* --- Outcomes ----------------------------------------------------------------------------------
 */

/* The outcome's free text, cleaned for the database (see text_dup_clean). */
struct outcome_text {
    char *reason;
    char *card_type;
    const char *card_last4; /* o->card_last4 when it is exactly 4 digits, else NULL */
    char *last_error;
};

static void outcome_text_free(struct outcome_text *t)
{
    free(t->reason);
    free(t->card_type);
    free(t->last_error);
}

/* Checks what the database cannot, or should not have to. */
static int outcome_check(const struct store_outcome *o, char *err, size_t err_len)
{
    const char *why = NULL;

    if ((int)o->action < (int)STORE_ACTION_NONE || (int)o->action > (int)STORE_ACTION_RESCHEDULE)
        why = "unknown action";
    else if (o->action != STORE_ACTION_NONE && (o->order_id == NULL || o->order_id[0] == '\0'))
        why = "order_id is required";
    else if (o->amount_minor < 0)
        why = "amount_minor is negative";
    else if (o->action == STORE_ACTION_RESCHEDULE && o->next_check_in_ms > (uint64_t)INT64_MAX)
        why = "next_check_in_ms is out of range";
    else if (o->job_id != NULL &&
             (o->queue == NULL || o->result == NULL || o->outcome == NULL ||
              (strcmp(o->outcome, "done") != 0 && strcmp(o->outcome, "dead") != 0)))
        why = "a job_log row needs queue, result and outcome \"done\" or \"dead\"";
    if (why == NULL)
        return 0;
    err_set(err, err_len, "invalid outcome: ", why);
    return SETTLE_EINVAL;
}

/* Writes the job's job_log row unless the job already has one (redelivery). */
static int job_log_insert(struct session *ss, const struct store_outcome *o,
                          const struct outcome_text *t, const char *result)
{
    char attempts[16], deliveries[16], enqueued[24];
    const char *params[11] = {o->job_id, o->queue, o->producer_id, o->order_id,   o->outcome,
                              result,    attempts, deliveries,     t->last_error, o->worker_id,
                              NULL};

    snprintf(attempts, sizeof(attempts), "%u", o->attempts);
    snprintf(deliveries, sizeof(deliveries), "%u", o->deliveries);
    if (o->enqueued_ms != 0) {
        snprintf(enqueued, sizeof(enqueued), "%" PRIu64, o->enqueued_ms);
        params[10] = enqueued;
    }
    /* INSERT the job_log row; a row already there for this job_id wins. */
    return exec_params(ss,
                       "INSERT INTO job_log (job_id, queue, producer_id, order_id, outcome, "
                       "result, attempts, deliveries, last_error, worker, enqueued_at) "
                       "VALUES ($1::text, $2::text, $3::text, $4::text, $5::text, $6::text, "
                       "$7::integer, $8::integer, $9::text, $10::text, "
                       "to_timestamp($11::double precision / 1000)) "
                       "ON CONFLICT (job_id) DO NOTHING",
                       11, params, NULL);
}

/* The order's status now, "" when there is no such order. */
static int order_status_read(struct session *ss, const char *order_id, char *status,
                             size_t status_size)
{
    const char *params[1] = {order_id};
    PGresult *res = NULL;
    int rc;

    status[0] = '\0';
    /* Reads the order's status as this transaction leaves it. */
    rc = exec_params(ss, "SELECT status FROM orders WHERE id = $1::text", 1, params, &res);
    if (rc == 0 && PQntuples(res) > 0)
        rc = copy_id(ss, status, status_size, PQgetvalue(res, 0, 0), "orders.status");
    PQclear(res);
    return rc;
}

static const char *const action_names[] = {
    [STORE_ACTION_NONE] = "none",
    [STORE_ACTION_COMPLETE] = "complete",
    [STORE_ACTION_FAIL] = "fail",
    [STORE_ACTION_EXPIRE] = "expire",
    [STORE_ACTION_MANUAL_REVIEW] = "manual_review",
    [STORE_ACTION_RESCHEDULE] = "reschedule",
};

/*
 * The batch's JSON text, written directly: an object tree (jansson) per outcome cost a
 * dozen allocations per job on the hottest path. Grows by doubling; oom sticks.
 */
struct jtext {
    char *p;
    size_t len, cap;
    bool oom;
};

/* Room for need more bytes and the terminating NUL. */
static bool jt_room(struct jtext *t, size_t need)
{
    if (t->oom)
        return false;
    if (t->cap > t->len && t->cap - t->len > need)
        return true;
    size_t cap = t->cap != 0 ? t->cap : 4096;
    while (cap - t->len <= need) {
        if (cap > SIZE_MAX / 2) {
            t->oom = true;
            return false;
        }
        cap *= 2;
    }
    char *p = realloc(t->p, cap);
    if (p == NULL) {
        t->oom = true;
        return false;
    }
    t->p = p;
    t->cap = cap;
    return true;
}

static void jt_raw(struct jtext *t, const char *s)
{
    size_t n = strlen(s);
    if (!jt_room(t, n))
        return;
    memcpy(t->p + t->len, s, n + 1);
    t->len += n;
}

/* key (with its separator, e.g. ",\"order_id\":") then v as a JSON string (escaped by
 * text_json_escape), or null. Bytes that are not valid UTF-8 become '?', as everywhere text
 * goes to the database (PostgreSQL would refuse the whole batch's jsonb for one of them). */
static void jt_text(struct jtext *t, const char *key, const char *v)
{
    jt_raw(t, key);
    if (v == NULL) {
        jt_raw(t, "null");
        return;
    }
    size_t len = strlen(v);
    if (len > (SIZE_MAX - 3) / TEXT_JSON_ESC_MAX || !jt_room(t, TEXT_JSON_ESC_MAX * len + 2))
        return;
    char *o = t->p + t->len;
    *o++ = '"';
    for (size_t k = 0; k < len;) {
        size_t in_len;
        size_t n = text_json_escape(v + k, len - k, o, &in_len);
        if (n == 0) {
            *o = '?';
            n = 1;
        }
        o += n;
        k += in_len;
    }
    *o++ = '"';
    *o = '\0';
    t->len = (size_t)(o - t->p);
}

static void jt_int(struct jtext *t, const char *key, int64_t v, bool present)
{
    char num[24];
    jt_raw(t, key);
    if (!present) {
        jt_raw(t, "null");
        return;
    }
    snprintf(num, sizeof(num), "%" PRId64, v);
    jt_raw(t, num);
}

/*
 * Appends the jsonb element settle_apply_outcomes() takes for outcome o, index i. Free text
 * is cleaned first (text_dup_clean: valid UTF-8, card numbers masked); only ever the last
 * four digits of a card go in. Out of memory sets t->oom.
 */
static void outcome_json(struct jtext *t, const struct store_outcome *o, size_t i)
{
    bool oom = false;
    const char *reason =
        o->action == STORE_ACTION_EXPIRE && o->reason == NULL ? EXPIRE_REASON_DEFAULT : o->reason;
    char *t_reason = text_dup_clean(reason, &oom);
    char *t_card_type = text_dup_clean(o->card_type, &oom);
    char *t_last_error = text_dup_clean(o->last_error, &oom);
    const char *last4 = o->card_last4 != NULL && strlen(o->card_last4) == 4 &&
                                strspn(o->card_last4, "0123456789") == 4
                            ? o->card_last4
                            : NULL;

    if (oom) {
        t->oom = true;
    } else {
        jt_raw(t, t->len > 1 ? ",{" : "{");
        jt_int(t, "\"i\":", (int64_t)i, true);
        jt_text(t, ",\"action\":", action_names[o->action]);
        jt_text(t, ",\"order_id\":", o->order_id);
        jt_text(t, ",\"transaction_key\":", o->transaction_key);
        jt_int(t, ",\"amount_minor\":", o->amount_minor, o->amount_minor > 0);
        jt_text(t, ",\"payment_status\":", o->payment_status);
        jt_text(t, ",\"reason\":", t_reason);
        jt_text(t, ",\"card_type\":", t_card_type);
        jt_text(t, ",\"card_last4\":", last4);
        jt_int(t, ",\"next_check_ms\":", (int64_t)o->next_check_in_ms, true);
        jt_text(t, ",\"job_id\":", o->job_id);
        jt_text(t, ",\"queue\":", o->queue);
        jt_text(t, ",\"producer_id\":", o->producer_id);
        jt_text(t, ",\"outcome\":", o->outcome);
        jt_text(t, ",\"result\":", o->result);
        jt_text(t, ",\"result_unapplied\":", o->result_unapplied);
        jt_int(t, ",\"attempts\":", o->attempts, true);
        jt_int(t, ",\"deliveries\":", o->deliveries, true);
        jt_text(t, ",\"last_error\":", t_last_error);
        jt_text(t, ",\"worker\":", o->worker_id);
        jt_int(t, ",\"enqueued_ms\":", (int64_t)o->enqueued_ms, o->enqueued_ms != 0);
        jt_raw(t, "}");
    }
    free(t_reason);
    free(t_card_type);
    free(t_last_error);
}

/* Reads one row of settle_apply_outcomes() into the job it names. */
static int apply_row_read(struct session *ss, const PGresult *res, int row, struct store_apply *a,
                          size_t n)
{
    int64_t i;
    bool drop;

    if (parse_i64(PQgetvalue(res, row, 0), &i) != 0 || i < 0 || (size_t)i >= n ||
        a[i].status != BATCH_WAITING) {
        err_set(ss->err, ss->err_len, "postgresql: ", "unexpected row from settle_apply_outcomes");
        return SETTLE_EINTERNAL;
    }
    if (!PQgetisnull(res, row, 3)) {
        /* The job's own statements failed and were rolled back alone: classified as the
         * error of a single-job transaction would be (a constraint is permanent, a deadlock
         * transient). Its connection is fine: the batch went on. */
        char prefix[32];
        snprintf(prefix, sizeof(prefix), "SQLSTATE %.5s: ", PQgetvalue(res, row, 3));
        err_set(a[i].err, sizeof(a[i].err), prefix, PQgetvalue(res, row, 4));
        a[i].status = sqlstate_classify(PQgetvalue(res, row, 3), &drop);
        return 0;
    }
    a[i].applied = PQgetvalue(res, row, 1)[0] == 't';
    copy_text(a[i].status_after, sizeof(a[i].status_after), PQgetvalue(res, row, 2));
    a[i].status = BATCH_ANSWERED;
    return 0;
}

int store_apply_outcomes_work(struct store *s, struct store_apply *a, size_t n)
{
    char err[STORE_ERR_MAX] = "";
    const char *params[1] = {NULL};
    struct session ss = {0};
    struct pipe_stmt st = {0};
    struct jtext text = {0};
    size_t sent = 0;
    int rc = 0;

    if (s == NULL || a == NULL || n == 0 || n > STORE_BATCH_MAX)
        return SETTLE_EINVAL;
    for (size_t i = 0; i < n; i++) {
        a[i].applied = false;
        a[i].status_after[0] = '\0';
        a[i].err[0] = '\0';
        a[i].status =
            a[i].o != NULL ? outcome_check(a[i].o, a[i].err, sizeof(a[i].err)) : SETTLE_EINVAL;
        if (a[i].status == 0) {
            a[i].status = BATCH_WAITING;
            sent++;
        }
    }
    if (sent == 0)
        goto out;
    jt_raw(&text, "[");
    for (size_t i = 0; i < n; i++)
        if (a[i].status == BATCH_WAITING)
            outcome_json(&text, a[i].o, i);
    jt_raw(&text, "]");
    /* One failed append leaves the text unusable: the whole batch is out of memory. */
    if (text.oom) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    params[0] = text.p;
    rc = session_open(s, &ss, err, sizeof(err));
    if (rc != 0)
        goto out;
    /* Every outcome of the batch, each in its own savepoint (ops/sql/004_outcome_batch.sql),
     * committed in the same flight. */
    st.id = HOT_APPLY_OUTCOMES;
    st.params = params;
    rc = tx_pipeline(&ss, BEGIN_SQL, &st, 1);
    /* Rows are read only from a committed transaction. One we cannot read (a bug) leaves
     * every job unanswered: they are retried, which the guards make harmless. */
    for (int row = 0; rc == 0 && row < PQntuples(st.res); row++)
        rc = apply_row_read(&ss, st.res, row, a, n);
out:
    for (size_t i = 0; i < n; i++) {
        if (a[i].status == BATCH_ANSWERED && rc == 0) {
            a[i].status = 0;
        } else if (a[i].status == BATCH_WAITING || a[i].status == BATCH_ANSWERED) {
            /* No answer for this job, or its answer was not committed. */
            a[i].applied = false;
            a[i].status_after[0] = '\0';
            a[i].status = rc != 0 ? rc : SETTLE_EINTERNAL;
            copy_text(a[i].err, sizeof(a[i].err),
                      err[0] != '\0' ? err : settle_strerror(a[i].status));
        }
    }
    PQclear(st.res);
    session_close(&ss);
    free(text.p);
    return rc;
}

/* --- Refunds -----------------------------------------------------------------------------------
 */

/* Columns of a refunds row as refund_row_read expects them. */
#define REFUND_COLUMNS                                                                             \
    "id, order_id, user_id, transaction_key, state, amount_minor, restock, restocked, "            \
    "attempts, coalesce(failure_reason, ''), coalesce(last_error, '')"

/* Fills row from row i of res (REFUND_COLUMNS). */
static int refund_row_read(struct session *ss, const PGresult *res, int i, struct refund_row *row)
{
    int64_t amount, attempts;
    int rc;

    memset(row, 0, sizeof(*row));
    rc = copy_id(ss, row->id, sizeof(row->id), PQgetvalue(res, i, 0), "refunds.id");
    if (rc == 0)
        rc = copy_id(ss, row->order_id, sizeof(row->order_id), PQgetvalue(res, i, 1),
                     "refunds.order_id");
    if (rc == 0)
        rc = copy_id(ss, row->user_id, sizeof(row->user_id), PQgetvalue(res, i, 2),
                     "refunds.user_id");
    if (rc == 0)
        rc = copy_id(ss, row->transaction_key, sizeof(row->transaction_key), PQgetvalue(res, i, 3),
                     "refunds.transaction_key");
    if (rc != 0)
        return rc;
    if (refund_state_parse(PQgetvalue(res, i, 4), &row->state) != 0 ||
        parse_i64(PQgetvalue(res, i, 5), &amount) != 0 || amount <= 0 ||
        parse_i64(PQgetvalue(res, i, 8), &attempts) != 0 || attempts < 0 ||
        (uint64_t)attempts > UINT_MAX) {
        err_set(ss->err, ss->err_len, "postgresql: ", "unexpected value in the refunds row");
        return SETTLE_EPARSE;
    }
    row->amount_minor = amount;
    row->pg_attempts = (unsigned)attempts;
    row->restock = strcmp(PQgetvalue(res, i, 6), "t") == 0;
    row->restocked = strcmp(PQgetvalue(res, i, 7), "t") == 0;
    /* Reason codes and messages are for people: cutting them is fine. */
    copy_text(row->failure_reason, sizeof(row->failure_reason), PQgetvalue(res, i, 9));
    copy_text(row->last_error, sizeof(row->last_error), PQgetvalue(res, i, 10));
    return 0;
}

/* Reads refund `id`; *found says whether it exists. */
static int refund_select(struct session *ss, const char *id, struct refund_row *row, bool *found)
{
    const char *params[1] = {id};
    PGresult *res = NULL;
    int rc;

    *found = false;
    /* Reads one refund row by its id (the Idempotency-Key). */
    rc = exec_params(ss, "SELECT " REFUND_COLUMNS " FROM refunds WHERE id = $1::text", 1, params,
                     &res);
    if (rc == 0 && PQntuples(res) > 0) {
        rc = refund_row_read(ss, res, 0, row);
        *found = rc == 0;
    }
    PQclear(res);
    return rc;
}

/* Sums the order's other refunds: live ones (they count against the balance) and
 * SUCCEEDED ones (money that went back already). */
static int refund_sums(struct session *ss, const char *order_id, const char *id, int64_t *live,
                       int64_t *succeeded)
{
    const char *params[2] = {order_id, id};
    PGresult *res = NULL;
    int rc;

    /* Sums the order's refunds other than $2, live (not FAILED) and SUCCEEDED. */
    rc = exec_params(ss,
                     "SELECT coalesce(sum(amount_minor) FILTER (WHERE state IN ('REQUESTED', "
                     "'SUCCEEDED', 'UNKNOWN', 'MANUAL_REVIEW')), 0), "
                     "coalesce(sum(amount_minor) FILTER (WHERE state = 'SUCCEEDED'), 0) "
                     "FROM refunds WHERE order_id = $1::text AND id <> $2::text",
                     2, params, &res);
    if (rc == 0 && (parse_i64(PQgetvalue(res, 0, 0), live) != 0 ||
                    parse_i64(PQgetvalue(res, 0, 1), succeeded) != 0)) {
        err_set(ss->err, ss->err_len, "postgresql: ", "unexpected refund sum");
        rc = SETTLE_EPARSE;
    }
    PQclear(res);
    return rc;
}

/* Locks the order's payment row and reads what refund_admit needs. */
static int refund_payment_lock(struct session *ss, const char *order_id,
                               struct refund_payment_view *v)
{
    const char *params[1] = {order_id};
    PGresult *res = NULL;
    int64_t amount;
    int rc;

    memset(v, 0, sizeof(*v));
    /* Locks the payment row (FOR UPDATE): every refund of this order queues up here, so the
     * balance check below and the insert are atomic with respect to each other. */
    rc = exec_params(ss,
                     "SELECT p.status, p.user_id, coalesce(p.transaction_key, ''), "
                     "p.amount_minor, o.user_id FROM payments p JOIN orders o ON o.id = "
                     "p.order_id WHERE p.order_id = $1::text FOR UPDATE OF p",
                     1, params, &res);
    if (rc != 0)
        goto out;
    if (PQntuples(res) > 0) {
        v->order_found = true;
        v->payment_found = true;
        rc = copy_id(ss, v->status, sizeof(v->status), PQgetvalue(res, 0, 0), "payments.status");
        if (rc == 0)
            rc = copy_id(ss, v->user_id, sizeof(v->user_id), PQgetvalue(res, 0, 1),
                         "payments.user_id");
        if (rc == 0)
            rc = copy_id(ss, v->transaction_key, sizeof(v->transaction_key), PQgetvalue(res, 0, 2),
                         "payments.transaction_key");
        if (rc == 0)
            rc = copy_id(ss, v->order_user_id, sizeof(v->order_user_id), PQgetvalue(res, 0, 4),
                         "orders.user_id");
        if (rc == 0 && parse_i64(PQgetvalue(res, 0, 3), &amount) != 0) {
            err_set(ss->err, ss->err_len, "postgresql: ", "unexpected payments.amount_minor");
            rc = SETTLE_EPARSE;
        }
        if (rc == 0)
            v->amount_minor = amount;
        goto out;
    }
    PQclear(res);
    res = NULL;
    /* No payment: does the order exist at all, and whose is it? */
    rc = exec_params(ss, "SELECT user_id FROM orders WHERE id = $1::text", 1, params, &res);
    if (rc == 0 && PQntuples(res) > 0) {
        v->order_found = true;
        rc = copy_id(ss, v->order_user_id, sizeof(v->order_user_id), PQgetvalue(res, 0, 0),
                     "orders.user_id");
    }
out:
    PQclear(res);
    return rc;
}

/* The order's items in sku order (for the Redis restock). */
static int refund_items(struct session *ss, const char *order_id, struct store_refund *out)
{
    char limit[16];
    const char *params[2] = {order_id, limit};
    PGresult *res = NULL;
    int n, rc;

    snprintf(limit, sizeof(limit), "%d", STORE_ITEMS_MAX + 1);
    /* Loads the order's items in sku order, at most STORE_ITEMS_MAX + 1 of them. */
    rc = exec_params(ss,
                     "SELECT sku, qty FROM order_items WHERE order_id = $1::text "
                     "ORDER BY sku LIMIT $2::integer",
                     2, params, &res);
    if (rc != 0)
        goto out;
    n = PQntuples(res);
    if (n > STORE_ITEMS_MAX) {
        err_set(ss->err, ss->err_len, "order has more items than settle accepts", "");
        rc = SETTLE_ETOOBIG;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int64_t qty;
        rc = copy_id(ss, out->items[i].sku, sizeof(out->items[i].sku), PQgetvalue(res, i, 0),
                     "order_items.sku");
        if (rc != 0)
            goto out;
        if (parse_i64(PQgetvalue(res, i, 1), &qty) != 0 || qty <= 0 || qty > INT32_MAX) {
            err_set(ss->err, ss->err_len, "postgresql: ", "unexpected order_items.qty");
            rc = SETTLE_EPARSE;
            goto out;
        }
        out->items[i].qty = (int32_t)qty;
    }
    out->n_items = (unsigned)n;
out:
    PQclear(res);
    return rc;
}

/* Inserts the refund as REQUESTED unless a row with its id exists. */
static int refund_insert(struct session *ss, const struct job *job, const char *id,
                         int64_t amount_minor)
{
    char amount[24];
    char *reason = NULL;
    bool oom = false;
    int rc;

    snprintf(amount, sizeof(amount), "%" PRId64, amount_minor);
    if (job->reason[0] != '\0') {
        reason = text_dup_clean(job->reason, &oom);
        if (oom)
            return SETTLE_ENOMEM;
    }
    const char *params[7] = {id,     job->order_id, job->transaction_key,           job->user_id,
                             amount, reason,        job->restock ? "true" : "false"};
    /* INSERT the refund as REQUESTED; a row already there with this id wins. */
    rc = exec_params(ss,
                     "INSERT INTO refunds (id, order_id, transaction_key, user_id, amount_minor, "
                     "reason, restock, state) VALUES ($1::text, $2::text, $3::text, $4::text, "
                     "$5::bigint, $6::text, $7::boolean, 'REQUESTED') "
                     "ON CONFLICT (id) DO NOTHING",
                     7, params, NULL);
    free(reason);
    return rc;
}

int store_refund_open_work(struct store *s, const struct job *job, const char *refund_id,
                           struct store_refund *out, char *err, size_t err_len)
{
    struct refund_payment_view v;
    struct session ss = {0};
    int64_t live = 0, succeeded = 0, amount = 0;
    bool found = false;
    int rc;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL || job == NULL || refund_id == NULL || refund_id[0] == '\0' || out == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    memset(out, 0, sizeof(*out));
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    rc = refund_payment_lock(&ss, job->order_id, &v);
    if (rc != 0)
        goto out;
    rc = refund_select(&ss, refund_id, &out->row, &found);
    if (rc != 0)
        goto out;
    if (found) {
        /* A redelivery (or the same request enqueued again): the row, whatever its state,
         * is the refund; nothing new is inserted. */
        out->admission = refund_match_existing(job, &out->row, out->why, sizeof(out->why));
    } else {
        rc = refund_sums(&ss, job->order_id, refund_id, &live, &succeeded);
        if (rc != 0)
            goto out;
        v.live_others_minor = live;
        out->admission = refund_admit(job, &v, &amount, out->why, sizeof(out->why));
        if (out->admission == REFUND_ADMIT_OK) {
            rc = refund_insert(&ss, job, refund_id, amount);
            if (rc == 0)
                rc = refund_select(&ss, refund_id, &out->row, &found);
            if (rc != 0)
                goto out;
            if (!found) {
                err_set(err, err_len, "postgresql: ", "the refund row vanished after its insert");
                rc = SETTLE_EINTERNAL;
                goto out;
            }
            /* The id may have been taken by a refund of another order in the meantime
             * (another payment lock): the row read back must be ours. */
            out->row.created = out->row.amount_minor == amount &&
                               refund_match_existing(job, &out->row, NULL, 0) == REFUND_ADMIT_OK;
            out->admission = refund_match_existing(job, &out->row, out->why, sizeof(out->why));
        }
    }
    if (out->admission == REFUND_ADMIT_OK) {
        rc = refund_sums(&ss, job->order_id, refund_id, &live, &succeeded);
        if (rc == 0)
            rc = refund_items(&ss, job->order_id, out);
        if (rc != 0)
            goto out;
        out->row.others_succeeded_minor = succeeded;
    }
    rc = tx_commit(&ss);
out:
    session_close(&ss);
    return rc;
}

/* Writes a job_log row from the job_log fields of log (NULL: nothing), with
 * log->result_unapplied as the result when the refund did not change (and one is given). */
static int refund_job_log(struct session *ss, const struct store_outcome *log, bool changed)
{
    struct outcome_text t = {0};
    bool oom = false;
    int rc;

    if (log == NULL || log->job_id == NULL)
        return 0;
    if (log->queue == NULL || log->result == NULL || log->outcome == NULL ||
        (strcmp(log->outcome, "done") != 0 && strcmp(log->outcome, "dead") != 0)) {
        err_set(ss->err, ss->err_len, "invalid outcome: ",
                "a job_log row needs queue, result and outcome \"done\" or \"dead\"");
        return SETTLE_EINVAL;
    }
    t.last_error = text_dup_clean(log->last_error, &oom);
    if (oom)
        return SETTLE_ENOMEM;
    rc = job_log_insert(ss, log, &t,
                        !changed && log->result_unapplied != NULL ? log->result_unapplied
                                                                  : log->result);
    outcome_text_free(&t);
    return rc;
}

/* The refund's state as the transaction leaves it; SETTLE_ENOTFOUND when it has no row. */
static int refund_state_read(struct session *ss, const char *id, enum refund_state *state)
{
    const char *params[1] = {id};
    PGresult *res = NULL;
    int rc;

    /* Reads the refund's state. */
    rc = exec_params(ss, "SELECT state FROM refunds WHERE id = $1::text", 1, params, &res);
    if (rc == 0 && PQntuples(res) == 0) {
        err_set(ss->err, ss->err_len, "no refund with this id", "");
        rc = SETTLE_ENOTFOUND;
    } else if (rc == 0 && refund_state_parse(PQgetvalue(res, 0, 0), state) != 0) {
        err_set(ss->err, ss->err_len, "postgresql: ", "unexpected refunds.state");
        rc = SETTLE_EPARSE;
    }
    PQclear(res);
    return rc;
}

int store_refund_mark_work(struct store *s, const char *refund_id, enum refund_state to,
                           const char *pg_status, const char *failure_reason,
                           const char *last_error, const struct store_outcome *log,
                           enum refund_state *state_after, char *err, size_t err_len)
{
    struct session ss = {0};
    char *pg = NULL, *msg = NULL;
    enum refund_state after = REFUND_REQUESTED;
    bool oom = false;
    int rc;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL || refund_id == NULL || refund_state_name(to) == NULL || to == REFUND_REQUESTED ||
        to == REFUND_SUCCEEDED || (log != NULL && log->action != STORE_ACTION_NONE)) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    pg = text_dup_clean(pg_status, &oom);
    msg = text_dup_clean(last_error, &oom);
    if (oom) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    const char *params[6] = {refund_id, refund_state_name(to),     pg, failure_reason,
                             msg,       refund_sources_literal(to)};
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Moves the refund to $2 when the transition table allows it from its current state
     * ($6) or it is there already (then only the error text and attempt count change). */
    rc = exec_params(&ss,
                     "UPDATE refunds SET state = $2::text, "
                     "pg_status = coalesce($3::text, pg_status), "
                     "failure_reason = coalesce($4::text, failure_reason), "
                     "last_error = $5::text, attempts = attempts + 1, updated_at = now() "
                     "WHERE id = $1::text AND (state = ANY ($6::text[]) OR state = $2::text)",
                     6, params, NULL);
    if (rc != 0)
        goto out;
    rc = refund_state_read(&ss, refund_id, &after);
    if (rc == 0 && after == to)
        rc = refund_job_log(&ss, log, true);
    if (rc == 0)
        rc = tx_commit(&ss);
    if (rc == 0 && state_after != NULL)
        *state_after = after;
out:
    session_close(&ss);
    free(pg);
    free(msg);
    return rc;
}

/* Reads a decimal column or fails with a message naming it. */
static int column_i64(struct session *ss, const PGresult *res, int col, const char *what,
                      int64_t *out)
{
    if (parse_i64(PQgetvalue(res, 0, col), out) != 0) {
        err_set(ss->err, ss->err_len, "postgresql: unexpected ", what);
        return SETTLE_EPARSE;
    }
    return 0;
}

/* Adds the refunded amount to the payment and the order and moves their statuses. */
static int refund_apply_amounts(struct session *ss, const char *order_id, int64_t amount,
                                const PGresult *locked)
{
    int64_t pay_amount, pay_refunded, ord_amount, ord_refunded;
    char pay_text[24], ord_text[24];
    const char *pay_status, *ord_status;
    int rc;

    rc = column_i64(ss, locked, 0, "payments.amount_minor", &pay_amount);
    if (rc == 0)
        rc = column_i64(ss, locked, 1, "payments.refunded_minor", &pay_refunded);
    if (rc == 0)
        rc = column_i64(ss, locked, 3, "orders.amount_minor", &ord_amount);
    if (rc == 0)
        rc = column_i64(ss, locked, 4, "orders.refunded_minor", &ord_refunded);
    if (rc != 0)
        return rc;
    pay_refunded += amount;
    /* The guard keeps refunds within the payment's amount. The order's amount is the same
     * in every flow settle runs (reconcile refuses a PG amount that differs), but should
     * they ever differ the order's CHECK must not undo a refund the PG already made: the
     * payment row carries the exact figure. */
    ord_refunded = ord_refunded + amount > ord_amount ? ord_amount : ord_refunded + amount;
    pay_status = refund_payment_status(pay_amount, pay_refunded);
    ord_status = refund_order_status(PQgetvalue(locked, 0, 2), ord_amount, ord_refunded);
    snprintf(pay_text, sizeof(pay_text), "%" PRId64, pay_refunded);
    snprintf(ord_text, sizeof(ord_text), "%" PRId64, ord_refunded);
    const char *pay_params[3] = {order_id, pay_text, pay_status};
    const char *ord_params[3] = {order_id, ord_text, ord_status};
    /* Adds the refund to the payment; CHECK (refunded_minor <= amount_minor) backs the guard. */
    rc = exec_params(ss,
                     "UPDATE payments SET refunded_minor = $2::bigint, status = $3::text, "
                     "updated_at = now() WHERE order_id = $1::text",
                     3, pay_params, NULL);
    if (rc != 0)
        return rc;
    /* Adds the refund to the order and moves its status (kept unless it was completed). */
    return exec_params(ss,
                       "UPDATE orders SET refunded_minor = $2::bigint, status = $3::text, "
                       "updated_at = now() WHERE id = $1::text",
                       3, ord_params, NULL);
}

/* The restock step: once per order, and units only where the order had taken them. */
static int refund_restock(struct session *ss, const char *refund_id, const char *order_id,
                          bool completed, bool *ran)
{
    const char *params[1] = {refund_id};
    const char *order_params[1] = {order_id};
    int64_t rows = 0;
    int rc;

    *ran = false;
    /* Marks the refund restocked unless it or another refund of its order already did. */
    rc = exec_count(ss,
                    "UPDATE refunds r SET restocked = true, updated_at = now() "
                    "WHERE r.id = $1::text AND r.state = 'SUCCEEDED' AND NOT r.restocked "
                    "AND NOT EXISTS (SELECT 1 FROM refunds x WHERE x.order_id = r.order_id "
                    "AND x.restocked AND x.id <> r.id)",
                    1, params, &rows);
    if (rc != 0 || rows == 0)
        return rc;
    *ran = true;
    /* Only a completed order took its units off products.stock (outcome_complete); one
     * that failed (out_of_stock after the charge) never did, so nothing goes back. */
    if (!completed)
        return 0;
    /* Locks the order's products in sku order, as outcome_complete does, so the two never
     * deadlock. */
    rc = exec_params(ss,
                     "SELECT p.sku FROM products p JOIN order_items i ON i.sku = p.sku "
                     "WHERE i.order_id = $1::text ORDER BY p.sku FOR UPDATE OF p",
                     1, order_params, NULL);
    if (rc != 0)
        return rc;
    /* Puts the order's items back on hand. */
    return exec_params(ss,
                       "UPDATE products p SET stock = p.stock + i.qty, updated_at = now() "
                       "FROM order_items i WHERE i.order_id = $1::text AND p.sku = i.sku",
                       1, order_params, NULL);
}

int store_refund_succeed_work(struct store *s, const struct store_refund_success *in,
                              struct store_refund_result *out, char *err, size_t err_len)
{
    struct session ss = {0};
    PGresult *locked = NULL, *res = NULL;
    char *pg = NULL;
    bool oom = false, completed;
    int rc;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (s == NULL || in == NULL || out == NULL || in->refund_id == NULL || in->order_id == NULL ||
        (in->log != NULL && in->log->action != STORE_ACTION_NONE)) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    memset(out, 0, sizeof(*out));
    pg = text_dup_clean(in->pg_status, &oom);
    if (oom) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    const char *lock_params[1] = {in->order_id};
    const char *ok_params[4] = {in->refund_id, pg, in->order_id,
                                refund_sources_literal(REFUND_SUCCEEDED)};
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Locks the payment and order rows (as the refund guard does) and reads their amounts,
     * and whether the order ever completed: its status says so even when the order was
     * completed by someone else (a callback handler) who did not set completed_at. */
    rc = exec_params(&ss,
                     "SELECT p.amount_minor, p.refunded_minor, o.status, o.amount_minor, "
                     "o.refunded_minor, (o.completed_at IS NOT NULL OR o.status IN "
                     "('COMPLETED', 'REFUNDED', 'PARTIALLY_REFUNDED')) "
                     "FROM payments p JOIN orders o ON o.id = p.order_id "
                     "WHERE p.order_id = $1::text FOR UPDATE OF p, o",
                     1, lock_params, &locked);
    if (rc != 0)
        goto out;
    if (PQntuples(locked) == 0) {
        err_set(err, err_len, "the refunded order has no payment row", "");
        rc = SETTLE_ENOTFOUND;
        goto out;
    }
    completed = strcmp(PQgetvalue(locked, 0, 5), "t") == 0;
    /* Moves the refund to SUCCEEDED when the table allows it; RETURNING says it happened. */
    rc = exec_params(&ss,
                     "UPDATE refunds SET state = 'SUCCEEDED', pg_status = $2::text, "
                     "failure_reason = NULL, last_error = NULL, attempts = attempts + 1, "
                     "updated_at = now() WHERE id = $1::text AND order_id = $3::text "
                     "AND state = ANY ($4::text[]) RETURNING amount_minor",
                     4, ok_params, &res);
    if (rc != 0)
        goto out;
    if (PQntuples(res) > 0) {
        int64_t amount;
        rc = column_i64(&ss, res, 0, "refunds.amount_minor", &amount);
        if (rc == 0)
            rc = refund_apply_amounts(&ss, in->order_id, amount, locked);
        if (rc != 0)
            goto out;
        out->changed = true;
    }
    rc = refund_state_read(&ss, in->refund_id, &out->state_after);
    if (rc == 0 && in->restock && out->state_after == REFUND_SUCCEEDED)
        rc = refund_restock(&ss, in->refund_id, in->order_id, completed, &out->restocked);
    if (rc == 0 && out->state_after == REFUND_SUCCEEDED)
        rc = refund_job_log(&ss, in->log, out->changed);
    if (rc != 0)
        goto out;
    PQclear(res);
    res = NULL;
    /* Reads the statuses this transaction leaves, for the job's log line. */
    rc = exec_params(&ss,
                     "SELECT o.status, p.status FROM orders o JOIN payments p "
                     "ON p.order_id = o.id WHERE o.id = $1::text",
                     1, lock_params, &res);
    if (rc == 0 && PQntuples(res) > 0) {
        copy_text(out->order_status, sizeof(out->order_status), PQgetvalue(res, 0, 0));
        copy_text(out->payment_status, sizeof(out->payment_status), PQgetvalue(res, 0, 1));
    }
    if (rc == 0)
        rc = tx_commit(&ss);
out:
    if (rc != 0 && out != NULL)
        out->changed = out->restocked = false;
    PQclear(locked);
    PQclear(res);
    session_close(&ss);
    free(pg);
    return rc;
}

/* --- Scheduled work ----------------------------------------------------------------------------
 */

/* epoch ms of a timestamptz, as SQL text: every time crosses this module as a number. */
#define EPOCH_MS(col) "(extract(epoch FROM " col ") * 1000)::bigint"

/* Clears err and checks the session-independent arguments every function here needs. */
static void err_clear(char *err, size_t err_len)
{
    if (err != NULL && err_len > 0)
        err[0] = '\0';
}

/* Parses a decimal integer column or fails the statement with what it was. */
static int column_int(struct session *ss, const PGresult *res, int row, int col, const char *what,
                      int64_t *out)
{
    if (parse_i64(PQgetvalue(res, row, col), out) != 0) {
        err_set(ss->err, ss->err_len, "postgresql: unexpected number in ", what);
        return SETTLE_EPARSE;
    }
    return 0;
}

/* Decimal text of n int64 values (NULL where absent[i]), kept alive for array_literal. */
struct int_texts {
    char (*buf)[24];
    const char **ptr;
};

static int int_texts_make(struct int_texts *t, size_t n, const int64_t *vals, size_t stride,
                          bool null_if_negative)
{
    t->buf = calloc(n + 1, sizeof(*t->buf));
    t->ptr = calloc(n + 1, sizeof(*t->ptr));
    if (t->buf == NULL || t->ptr == NULL)
        return SETTLE_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        int64_t v = *(const int64_t *)(const void *)((const char *)vals + i * stride);
        if (null_if_negative && v < 0) {
            t->ptr[i] = NULL;
            continue;
        }
        snprintf(t->buf[i], sizeof(t->buf[i]), "%" PRId64, v);
        t->ptr[i] = t->buf[i];
    }
    return 0;
}

static void int_texts_free(struct int_texts *t)
{
    free(t->buf);
    free(t->ptr);
    t->buf = NULL;
    t->ptr = NULL;
}

/* Most columns a record_columns insert takes. */
#define COLUMNS_MAX 9

/* A task's findings as parallel text arrays, one per column, for one INSERT ... SELECT FROM
 * unnest(...): a run of any size is one statement. cols_make allocates; the caller fills
 * col[k][i] (pointers it keeps alive) and passes them to record_columns; cols_free always. */
struct columns {
    int ncols;
    const char **col[COLUMNS_MAX];
    char *lit[COLUMNS_MAX]; /* the array literals, made by record_columns */
};

static int cols_make(struct columns *c, int ncols, size_t n)
{
    memset(c, 0, sizeof(*c));
    if (ncols < 1 || ncols > COLUMNS_MAX)
        return SETTLE_EINVAL;
    c->ncols = ncols;
    for (int k = 0; k < ncols; k++) {
        c->col[k] = calloc(n, sizeof(*c->col[k]));
        if (c->col[k] == NULL)
            return SETTLE_ENOMEM;
    }
    return 0;
}

static void cols_free(struct columns *c)
{
    for (int k = 0; k < c->ncols; k++) {
        free(c->col[k]);
        free(c->lit[k]);
    }
    memset(c, 0, sizeof(*c));
}

/* Runs insert_sql in its own transaction with $1 = period and $2.. = the n rows' columns as
 * array literals. The statement's ON CONFLICT keeps a repeated run period's first rows. */
static int record_columns(struct store *s, const char *insert_sql, const char *period,
                          struct columns *c, size_t n, char *err, size_t err_len)
{
    struct session ss = {0};
    const char *params[COLUMNS_MAX + 1] = {period};
    int rc = 0;

    for (int k = 0; k < c->ncols; k++) {
        c->lit[k] = array_literal(c->col[k], n);
        if (c->lit[k] == NULL)
            return SETTLE_ENOMEM;
        params[k + 1] = c->lit[k];
    }
    rc = session_open(s, &ss, err, err_len);
    if (rc == 0)
        rc = tx_begin(&ss, BEGIN_SQL);
    if (rc == 0)
        rc = exec_params(&ss, insert_sql, c->ncols + 1, params, NULL);
    if (rc == 0)
        rc = tx_commit(&ss);
    session_close(&ss);
    return rc;
}

/* Columns of a task_runs row as task_row_read expects them. */
#define TASK_COLUMNS                                                                               \
    "r.period, coalesce(r.seq, 0), r.status, " EPOCH_MS("r.started_at") ", " EPOCH_MS(             \
        "r.heartbeat_at") ", coalesce(" EPOCH_MS("r.finished_at") ", -1), r.attempts, r.worker"

/* Fills *row from row i of res (TASK_COLUMNS after a leading task column). */
static int task_row_read(struct session *ss, const PGresult *res, int i, struct store_task_row *row)
{
    int64_t attempts;
    int rc;

    memset(row, 0, sizeof(*row));
    rc = copy_id(ss, row->period, sizeof(row->period), PQgetvalue(res, i, 1), "task_runs.period");
    if (rc == 0)
        rc = copy_id(ss, row->status, sizeof(row->status), PQgetvalue(res, i, 3),
                     "task_runs.status");
    if (rc == 0)
        rc = column_int(ss, res, i, 2, "task_runs.seq", &row->seq);
    if (rc == 0)
        rc = column_int(ss, res, i, 4, "task_runs.started_at", &row->started_ms);
    if (rc == 0)
        rc = column_int(ss, res, i, 5, "task_runs.heartbeat_at", &row->heartbeat_ms);
    if (rc == 0)
        rc = column_int(ss, res, i, 6, "task_runs.finished_at", &row->finished_ms);
    if (rc == 0)
        rc = column_int(ss, res, i, 7, "task_runs.attempts", &attempts);
    if (rc != 0)
        return rc;
    /* The worker name is for people (a log line); cutting it is harmless. */
    copy_text(row->worker, sizeof(row->worker), PQgetvalue(res, i, 8));
    row->attempts = attempts > 0 && attempts < INT_MAX ? (unsigned)attempts : 1;
    row->found = true;
    return 0;
}

/* Copies each result row into rows[] of the task it names (the first column). */
static int task_rows_place(struct session *ss, const PGresult *res, size_t n,
                           const char *const *tasks, const char (*periods)[STORE_PERIOD_MAX + 1],
                           bool want_interval, struct store_task_row *rows)
{
    for (int r = 0; r < PQntuples(res); r++) {
        for (size_t i = 0; i < n; i++) {
            bool interval = periods[i][0] == '\0';
            if (interval != want_interval || strcmp(tasks[i], PQgetvalue(res, r, 0)) != 0 ||
                (!interval && strcmp(periods[i], PQgetvalue(res, r, 1)) != 0))
                continue;
            int rc = task_row_read(ss, res, r, &rows[i]);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

int store_task_states_work(struct store *s, size_t n, const char *const *tasks,
                           store_period_fn period_of, void *arg, struct store_task_row *rows,
                           int64_t *now_ms, char *err, size_t err_len)
{
    char periods[16][STORE_PERIOD_MAX + 1];
    const char *iv_tasks[16], *d_tasks[16], *d_periods[16];
    size_t n_iv = 0, n_d = 0;
    char *iv_lit = NULL, *dt_lit = NULL, *dp_lit = NULL;
    struct session ss = {0};
    PGresult *res = NULL;
    int rc;

    err_clear(err, err_len);
    if (s == NULL || n == 0 || n > 16 || tasks == NULL || period_of == NULL || rows == NULL ||
        now_ms == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    memset(rows, 0, n * sizeof(*rows));
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* PostgreSQL's clock: every worker schedules by it, so theirs do not need to agree. */
    rc = exec_params(&ss, "SELECT " EPOCH_MS("now()"), 0, NULL, &res);
    if (rc == 0)
        rc = column_int(&ss, res, 0, 0, "now()", now_ms);
    if (rc != 0)
        goto out;
    PQclear(res);
    res = NULL;
    for (size_t i = 0; i < n; i++) {
        periods[i][0] = '\0';
        rc = period_of(arg, *now_ms, i, periods[i]);
        if (rc != 0)
            goto out;
        if (periods[i][0] == '\0') {
            iv_tasks[n_iv++] = tasks[i];
        } else {
            d_tasks[n_d] = tasks[i];
            d_periods[n_d++] = periods[i];
        }
    }
    if (n_iv > 0) {
        iv_lit = array_literal(iv_tasks, n_iv);
        if (iv_lit == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
        const char *p[1] = {iv_lit};
        /* Each interval task's latest run (the index on (task, seq DESC) serves it). */
        rc = exec_params(&ss,
                         "SELECT DISTINCT ON (r.task) r.task, " TASK_COLUMNS " FROM task_runs r "
                         "WHERE r.task = ANY ($1::text[]) AND r.seq IS NOT NULL "
                         "ORDER BY r.task, r.seq DESC",
                         1, p, &res);
        if (rc == 0)
            rc = task_rows_place(&ss, res, n, tasks, periods, true, rows);
        if (rc != 0)
            goto out;
        PQclear(res);
        res = NULL;
    }
    if (n_d > 0) {
        dt_lit = array_literal(d_tasks, n_d);
        dp_lit = array_literal(d_periods, n_d);
        if (dt_lit == NULL || dp_lit == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
        const char *p[2] = {dt_lit, dp_lit};
        /* The rows of the daily tasks' current periods (primary key lookups). */
        rc = exec_params(&ss,
                         "SELECT r.task, " TASK_COLUMNS " FROM task_runs r "
                         "JOIN unnest($1::text[], $2::text[]) AS w(task, period) "
                         "ON r.task = w.task AND r.period = w.period",
                         2, p, &res);
        if (rc == 0)
            rc = task_rows_place(&ss, res, n, tasks, periods, false, rows);
        if (rc != 0)
            goto out;
    }
    rc = tx_commit(&ss);
out:
    free(iv_lit);
    free(dt_lit);
    free(dp_lit);
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_task_claim_work(struct store *s, const struct store_task_claim *c, bool *claimed,
                          bool *took_over, char *err, size_t err_len)
{
    char seq[24], stale[24], retry[24], attempts[16];
    struct session ss = {0};
    PGresult *res = NULL;
    int64_t rows = 0;
    int rc;

    err_clear(err, err_len);
    if (claimed != NULL)
        *claimed = false;
    if (took_over != NULL)
        *took_over = false;
    if (s == NULL || c == NULL || claimed == NULL || c->task == NULL || c->period == NULL ||
        c->worker == NULL || (c->kind == STORE_CLAIM_INTERVAL && c->seq <= 0)) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    snprintf(seq, sizeof(seq), "%" PRId64, c->seq);
    snprintf(stale, sizeof(stale), "%" PRIu64, c->stale_ms);
    snprintf(retry, sizeof(retry), "%" PRIu64, c->retry_ms);
    snprintf(attempts, sizeof(attempts), "%u", c->max_attempts);
    const char *dry = c->dry_run ? "true" : "false";
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    switch (c->kind) {
    case STORE_CLAIM_INTERVAL: {
        if (c->stale_period != NULL) {
            const char *p[4] = {c->task, c->stale_period, stale, c->worker};
            /* Marks a run whose worker stopped beating failed, if it still is that run. */
            rc = exec_count(&ss,
                            "UPDATE task_runs SET status = 'failed', finished_at = now(), "
                            "error = 'worker ' || worker || ' died: no heartbeat for ' || "
                            "$3::text || ' ms; run ' || $2::text || ' taken over by ' || "
                            "$4::text WHERE task = $1::text AND period = $2::text "
                            "AND status = 'running' "
                            "AND heartbeat_at < now() - $3::bigint * interval '1 millisecond'",
                            4, p, &rows);
            if (rc != 0)
                goto out;
            if (rows == 0) {
                /* It finished, or another worker took it over first: nothing to claim. */
                rc = tx_commit(&ss);
                goto out;
            }
            if (took_over != NULL)
                *took_over = true;
        }
        const char *p[5] = {c->task, c->period, seq, c->worker, dry};
        /* Claims run seq: the primary key lets exactly one worker's insert win. */
        rc = exec_count(&ss,
                        "INSERT INTO task_runs (task, period, seq, worker, dry_run) "
                        "VALUES ($1::text, $2::text, $3::bigint, $4::text, $5::boolean) "
                        "ON CONFLICT (task, period) DO NOTHING",
                        5, p, &rows);
        break;
    }
    case STORE_CLAIM_DAILY: {
        const char *p[7] = {c->task, c->period, c->worker, dry, attempts, retry, stale};
        /* Claims the day's run, or the next attempt of one that failed retry ms ago or whose
         * worker stopped beating; old_status (read before the statement) says which. */
        rc = exec_params(&ss,
                         "WITH old AS (SELECT status FROM task_runs WHERE task = $1::text "
                         "AND period = $2::text) "
                         "INSERT INTO task_runs AS t (task, period, worker, dry_run) "
                         "VALUES ($1::text, $2::text, $3::text, $4::boolean) "
                         "ON CONFLICT (task, period) DO UPDATE SET status = 'running', "
                         "started_at = now(), heartbeat_at = now(), finished_at = NULL, "
                         "worker = EXCLUDED.worker, dry_run = EXCLUDED.dry_run, "
                         "attempts = t.attempts + 1, summary = NULL, "
                         "error = CASE WHEN t.status = 'running' THEN 'attempt ' || t.attempts "
                         "|| ' by ' || t.worker || ' died (no heartbeat)' ELSE t.error END "
                         "WHERE t.attempts < $5::integer AND ((t.status = 'failed' "
                         "AND t.finished_at <= now() - $6::bigint * interval '1 millisecond') "
                         "OR (t.status = 'running' "
                         "AND t.heartbeat_at < now() - $7::bigint * interval '1 millisecond')) "
                         "RETURNING (SELECT status FROM old)",
                         7, p, &res);
        if (rc != 0)
            goto out;
        rows = PQntuples(res);
        if (rows > 0 && took_over != NULL && strcmp(PQgetvalue(res, 0, 0), "running") == 0)
            *took_over = true;
        break;
    }
    case STORE_CLAIM_MANUAL: {
        const char *p[4] = {c->task, c->period, c->worker, dry};
        /* Records a manual run under its own period, beside the scheduled ones. */
        rc = exec_count(&ss,
                        "INSERT INTO task_runs (task, period, worker, dry_run) "
                        "VALUES ($1::text, $2::text, $3::text, $4::boolean) "
                        "ON CONFLICT (task, period) DO NOTHING",
                        4, p, &rows);
        break;
    }
    default:
        fprintf(stderr, "%s:%d: unknown claim kind %d\n", __FILE__, __LINE__, (int)c->kind);
        abort();
    }
    if (rc != 0)
        goto out;
    rc = tx_commit(&ss);
    if (rc == 0)
        *claimed = rows > 0;
out:
    if (rc != 0 && took_over != NULL)
        *took_over = false;
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_task_heartbeat_work(struct store *s, const char *task, const char *period,
                              const char *worker, bool *ours, char *err, size_t err_len)
{
    const char *params[3] = {task, period, worker};
    struct session ss = {0};
    int64_t rows = 0;
    int rc;

    err_clear(err, err_len);
    if (s == NULL || task == NULL || period == NULL || worker == NULL || ours == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Shows the run is alive, while it is still this worker's. */
    rc = exec_count(&ss,
                    "UPDATE task_runs SET heartbeat_at = now() WHERE task = $1::text "
                    "AND period = $2::text AND worker = $3::text AND status = 'running'",
                    3, params, &rows);
    if (rc == 0)
        rc = tx_commit(&ss);
    if (rc == 0)
        *ours = rows > 0;
out:
    session_close(&ss);
    return rc;
}

int store_task_finish_work(struct store *s, const char *task, const char *period,
                           const char *worker, const char *status, const char *summary_json,
                           const char *error, bool *recorded, char *err, size_t err_len)
{
    struct session ss = {0};
    char *clean_error = NULL;
    bool oom = false;
    int64_t rows = 0;
    int rc;

    err_clear(err, err_len);
    if (recorded != NULL)
        *recorded = false;
    if (s == NULL || task == NULL || period == NULL || worker == NULL || status == NULL ||
        (strcmp(status, "done") != 0 && strcmp(status, "failed") != 0)) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    clean_error = text_dup_clean(error, &oom);
    if (oom) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    const char *params[6] = {task, period, worker, status, summary_json, clean_error};
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Ends the run with its summary, only while it is still this worker's. */
    rc = exec_count(&ss,
                    "UPDATE task_runs SET status = $4::text, finished_at = now(), "
                    "heartbeat_at = now(), summary = $5::jsonb, error = $6::text "
                    "WHERE task = $1::text AND period = $2::text AND worker = $3::text "
                    "AND status = 'running'",
                    6, params, &rows);
    if (rc == 0)
        rc = tx_commit(&ss);
    if (rc == 0 && recorded != NULL)
        *recorded = rows > 0;
out:
    free(clean_error);
    session_close(&ss);
    return rc;
}

int store_pending_orders_work(struct store *s, const struct store_pending_query *q,
                              struct store_pending_order **out, size_t *n, char *err,
                              size_t err_len)
{
    char age[24], grace[24], limit[16], key[4];
    struct store_pending_order *list = NULL;
    struct session ss = {0};
    PGresult *res = NULL;
    int rows = 0, rc;

    err_clear(err, err_len);
    if (s == NULL || q == NULL || out == NULL || n == NULL || q->limit == 0 ||
        q->min_age_ms > (uint64_t)INT64_MAX || q->recheck_grace_ms > (uint64_t)INT64_MAX) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    *out = NULL;
    *n = 0;
    snprintf(age, sizeof(age), "%" PRIu64, q->min_age_ms);
    snprintf(grace, sizeof(grace), "%" PRIu64, q->recheck_grace_ms);
    snprintf(limit, sizeof(limit), "%u", q->limit);
    snprintf(key, sizeof(key), "%d", (int)q->key);
    const char *params[5] = {age, key, q->unwatched_only ? "true" : "false", grace, limit};
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* PENDING orders older than $1 ms, filtered by whether a transaction key is known ($2:
     * 0 any, 1 with, 2 without) and, with $3, by nobody re-checking them, oldest first. The
     * partial index on PENDING orders' created_at serves the scan. */
    rc = exec_params(
        &ss,
        "SELECT o.id, o.user_id, coalesce(p.transaction_key, ''), "
        "greatest(0, " EPOCH_MS(
            "(now() - o.created_at)") ") "
                                      "FROM orders o LEFT JOIN payments p ON p.order_id = o.id "
                                      "WHERE o.status = 'PENDING' "
                                      "AND o.created_at < now() - $1::bigint * interval '1 "
                                      "millisecond' "
                                      "AND ($2::integer = 0 OR ($2::integer = 1) = "
                                      "(p.transaction_key IS NOT NULL)) "
                                      "AND (NOT $3::boolean OR o.next_check_at IS NULL OR "
                                      "o.next_check_at < now() "
                                      "- $4::bigint * interval '1 millisecond') "
                                      "ORDER BY o.created_at, o.id LIMIT $5::integer",
        5, params, &res);
    if (rc != 0)
        goto out;
    rows = PQntuples(res);
    if (rows > 0) {
        list = calloc((size_t)rows, sizeof(*list));
        if (list == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
    }
    for (int i = 0; i < rows; i++) {
        int64_t a;
        rc = copy_id(&ss, list[i].id, sizeof(list[i].id), PQgetvalue(res, i, 0), "orders.id");
        if (rc == 0)
            rc = copy_id(&ss, list[i].user_id, sizeof(list[i].user_id), PQgetvalue(res, i, 1),
                         "orders.user_id");
        if (rc == 0)
            rc = copy_id(&ss, list[i].transaction_key, sizeof(list[i].transaction_key),
                         PQgetvalue(res, i, 2), "payments.transaction_key");
        if (rc == 0)
            rc = column_int(&ss, res, i, 3, "order age", &a);
        if (rc != 0)
            goto out;
        list[i].age_ms = (uint64_t)a;
    }
    rc = tx_commit(&ss);
    if (rc != 0)
        goto out;
    *out = list;
    *n = (size_t)rows;
    list = NULL;
out:
    free(list);
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_expire_order_work(struct store *s, const char *order_id, const char *reason,
                            bool *expired, char *status_after, char *err, size_t err_len)
{
    struct session ss = {0};
    int64_t rows = 0;
    int rc;

    err_clear(err, err_len);
    if (expired != NULL)
        *expired = false;
    if (status_after != NULL)
        status_after[0] = '\0';
    if (s == NULL || order_id == NULL || order_id[0] == '\0' || expired == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    const char *params[2] = {order_id, reason != NULL ? reason : EXPIRE_REASON_DEFAULT};
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* PENDING -> EXPIRED, unless a transaction key was recorded meanwhile (then the order
     * has a payment to reconcile and is never expired blindly). */
    rc = exec_count(&ss,
                    "UPDATE orders o SET status = 'EXPIRED', failure_reason = $2::text, "
                    "updated_at = now() WHERE o.id = $1::text AND o.status = 'PENDING' "
                    "AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.order_id = o.id "
                    "AND p.transaction_key IS NOT NULL)",
                    2, params, &rows);
    if (rc == 0 && status_after != NULL)
        rc = order_status_read(&ss, order_id, status_after, STORE_STATUS_MAX);
    if (rc == 0)
        rc = tx_commit(&ss);
    if (rc == 0)
        *expired = rows > 0;
out:
    session_close(&ss);
    return rc;
}

int store_orders_lookup_work(struct store *s, const char *const *ids, size_t n,
                             struct store_order_match *out, size_t *found, char *err,
                             size_t err_len)
{
    struct session ss = {0};
    PGresult *res = NULL;
    char *ids_lit = NULL;
    int rows = 0, rc;

    err_clear(err, err_len);
    if (found != NULL)
        *found = 0;
    if (s == NULL || ids == NULL || out == NULL || found == NULL || n == 0 || n > 10000) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    ids_lit = array_literal(ids, n);
    if (ids_lit == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    const char *params[1] = {ids_lit};
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* One batch of orders by id (= ANY uses the primary key), with the payment and whether
     * a refund that is not FAILED exists for the order. */
    rc = exec_params(&ss,
                     "SELECT o.id, o.user_id, o.status, o.amount_minor, "
                     "coalesce(p.transaction_key, ''), coalesce(p.status, ''), "
                     "EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id "
                     "AND r.state <> 'FAILED') "
                     "FROM orders o LEFT JOIN payments p ON p.order_id = o.id "
                     "WHERE o.id = ANY ($1::text[])",
                     1, params, &res);
    if (rc != 0)
        goto out;
    rows = PQntuples(res);
    if ((size_t)rows > n) {
        err_set(err, err_len, "postgresql: ", "more orders than ids looked up");
        rc = SETTLE_EINTERNAL;
        goto out;
    }
    for (int i = 0; i < rows; i++) {
        struct store_order_match *m = &out[i];
        memset(m, 0, sizeof(*m));
        rc = copy_id(&ss, m->id, sizeof(m->id), PQgetvalue(res, i, 0), "orders.id");
        if (rc == 0)
            rc = copy_id(&ss, m->user_id, sizeof(m->user_id), PQgetvalue(res, i, 1),
                         "orders.user_id");
        if (rc == 0)
            rc = copy_id(&ss, m->status, sizeof(m->status), PQgetvalue(res, i, 2), "orders.status");
        if (rc == 0)
            rc = column_int(&ss, res, i, 3, "orders.amount_minor", &m->amount_minor);
        if (rc == 0)
            rc = copy_id(&ss, m->payment_key, sizeof(m->payment_key), PQgetvalue(res, i, 4),
                         "payments.transaction_key");
        if (rc == 0)
            rc = copy_id(&ss, m->payment_status, sizeof(m->payment_status), PQgetvalue(res, i, 5),
                         "payments.status");
        if (rc != 0)
            goto out;
        m->refund_open = strcmp(PQgetvalue(res, i, 6), "t") == 0;
    }
    rc = tx_commit(&ss);
    if (rc == 0)
        *found = (size_t)rows;
out:
    free(ids_lit);
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_orphan_payment_work(struct store *s, const char *order_id, const char *transaction_key,
                              int64_t amount_minor, bool *ready, char *detail, size_t detail_len,
                              char *err, size_t err_len)
{
    char amount[24];
    struct session ss = {0};
    PGresult *res = NULL;
    int rc;

    err_clear(err, err_len);
    if (detail != NULL && detail_len > 0)
        detail[0] = '\0';
    if (ready != NULL)
        *ready = false;
    if (s == NULL || order_id == NULL || transaction_key == NULL || transaction_key[0] == '\0' ||
        amount_minor <= 0 || ready == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    snprintf(amount, sizeof(amount), "%" PRId64, amount_minor);
    const char *params[3] = {order_id, transaction_key, amount};
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Records the captured payment of a FAILED/EXPIRED order for its full amount: a new
     * payments row, or a PENDING/FAILED row of the same (or no) key moves to SUCCESS. A row
     * of another key is left alone (the order has another payment; a person decides). The
     * unique transaction_key refuses a key that belongs to another order. */
    rc = exec_params(&ss,
                     "INSERT INTO payments AS p (order_id, transaction_key, user_id, "
                     "amount_minor, status, reason) "
                     "SELECT o.id, $2::text, o.user_id, $3::bigint, 'SUCCESS', "
                     "'captured at the PG; found by the orphan sweep' FROM orders o "
                     "WHERE o.id = $1::text AND o.status IN ('FAILED', 'EXPIRED') "
                     "AND o.amount_minor = $3::bigint "
                     "ON CONFLICT (order_id) DO UPDATE SET status = 'SUCCESS', "
                     "transaction_key = EXCLUDED.transaction_key, "
                     "amount_minor = EXCLUDED.amount_minor, reason = EXCLUDED.reason, "
                     "updated_at = now() "
                     "WHERE (p.transaction_key = EXCLUDED.transaction_key "
                     "OR p.transaction_key IS NULL) AND p.status IN ('PENDING', 'FAILED')",
                     3, params, NULL);
    if (rc != 0)
        goto out;
    /* Reads the payment the order has now. */
    rc = exec_params(&ss,
                     "SELECT coalesce(transaction_key, ''), status FROM payments "
                     "WHERE order_id = $1::text",
                     1, params, &res);
    if (rc != 0)
        goto out;
    if (PQntuples(res) == 0) {
        snprintf(detail, detail_len, "the order is not FAILED/EXPIRED for this amount");
    } else if (strcmp(PQgetvalue(res, 0, 0), transaction_key) != 0) {
        snprintf(detail, detail_len, "the order's payment is another transaction (%.64s)",
                 PQgetvalue(res, 0, 0));
    } else if (strcmp(PQgetvalue(res, 0, 1), "SUCCESS") != 0 &&
               strcmp(PQgetvalue(res, 0, 1), "PARTIALLY_REFUNDED") != 0) {
        snprintf(detail, detail_len, "the payment is %.24s here", PQgetvalue(res, 0, 1));
    } else {
        *ready = true;
    }
    rc = tx_commit(&ss);
    if (rc != 0)
        *ready = false;
out:
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_orphan_decisions_work(struct store *s, const char *period,
                                const struct store_orphan_decision *d, size_t n, char *err,
                                size_t err_len)
{
    struct int_texts amounts = {0}, created = {0};
    struct columns c = {0};
    int rc = 0;

    err_clear(err, err_len);
    if (s == NULL || period == NULL || (n > 0 && d == NULL))
        return SETTLE_EINVAL;
    if (n == 0)
        return 0;
    if (int_texts_make(&amounts, n, &d[0].amount_minor, sizeof(d[0]), false) != 0 ||
        int_texts_make(&created, n, &d[0].pg_created_ms, sizeof(d[0]), true) != 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    rc = cols_make(&c, 9, n);
    if (rc != 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        c.col[0][i] = d[i].transaction_key;
        c.col[1][i] = d[i].order_id;
        c.col[2][i] = d[i].user_id;
        c.col[3][i] = amounts.ptr[i];
        c.col[4][i] = d[i].pg_status;
        c.col[5][i] = created.ptr[i];
        c.col[6][i] = d[i].order_status;
        c.col[7][i] = d[i].decision;
        c.col[8][i] = d[i].detail;
    }
    /* One row per decision; a repeated run period keeps its first. */
    rc = record_columns(s,
                        "INSERT INTO orphan_decisions (period, transaction_key, order_id, "
                        "user_id, amount_minor, pg_status, pg_created_at, order_status, decision, "
                        "detail) "
                        "SELECT $1::text, k, o, u, a, ps, to_timestamp(c::double precision / "
                        "1000), os, dc, dt FROM unnest($2::text[], $3::text[], $4::text[], "
                        "$5::bigint[], $6::text[], $7::bigint[], $8::text[], $9::text[], "
                        "$10::text[]) AS x(k, o, u, a, ps, c, os, dc, dt) "
                        "ON CONFLICT (task, period, transaction_key) DO NOTHING",
                        period, &c, n, err, err_len);
out:
    cols_free(&c);
    int_texts_free(&amounts);
    int_texts_free(&created);
    return rc;
}

int store_stock_batch_work(struct store *s, const char *after_sku, unsigned limit,
                           struct store_product *rows, size_t *n_rows,
                           struct store_unapplied_item **items, size_t *n_items, char *err,
                           size_t err_len)
{
    char lim[16], max_items[16];
    struct store_unapplied_item *list = NULL;
    struct session ss = {0};
    PGresult *res = NULL;
    const char **skus = NULL;
    char *skus_lit = NULL;
    int nr = 0, ni = 0, rc;

    err_clear(err, err_len);
    if (s == NULL || after_sku == NULL || limit == 0 || rows == NULL || n_rows == NULL ||
        items == NULL || n_items == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    *n_rows = 0;
    *items = NULL;
    *n_items = 0;
    snprintf(lim, sizeof(lim), "%u", limit);
    snprintf(max_items, sizeof(max_items), "%d", STORE_UNAPPLIED_MAX + 1);
    const char *p1[2] = {after_sku, lim};
    rc = session_open(s, &ss, err, err_len);
    if (rc != 0)
        goto out;
    /* One snapshot for both reads: on hand and the unapplied sales are then consistent. */
    rc = tx_begin(&ss, BEGIN_READ_SQL);
    if (rc != 0)
        goto out;
    /* The next batch of products in sku order (keyset pagination). */
    rc = exec_params(&ss,
                     "SELECT sku, stock FROM products WHERE sku > $1::text ORDER BY sku "
                     "LIMIT $2::integer",
                     2, p1, &res);
    if (rc != 0)
        goto out;
    nr = PQntuples(res);
    if ((unsigned)nr > limit) {
        rc = SETTLE_EINTERNAL;
        goto out;
    }
    skus = calloc((size_t)nr + 1, sizeof(*skus));
    if (skus == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    for (int i = 0; i < nr; i++) {
        rc = copy_id(&ss, rows[i].sku, sizeof(rows[i].sku), PQgetvalue(res, i, 0), "products.sku");
        if (rc == 0)
            rc = column_int(&ss, res, i, 1, "products.stock", &rows[i].on_hand);
        if (rc != 0)
            goto out;
        skus[i] = rows[i].sku;
    }
    PQclear(res);
    res = NULL;
    if (nr > 0) {
        skus_lit = array_literal(skus, (size_t)nr);
        if (skus_lit == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
        const char *p2[2] = {skus_lit, max_items};
        /* Items of orders whose sale PostgreSQL has not applied yet (PENDING, or held for a
         * person in MANUAL_REVIEW) that hold these SKUs: their Redis reservation may
         * already be committed, with the units gone from Redis but still on hand here. */
        rc = exec_params(&ss,
                         "SELECT i.order_id, i.sku, i.qty FROM order_items i "
                         "JOIN orders o ON o.id = i.order_id "
                         "WHERE o.status IN ('PENDING', 'MANUAL_REVIEW') "
                         "AND i.sku = ANY ($1::text[]) ORDER BY i.order_id, i.sku "
                         "LIMIT $2::integer",
                         2, p2, &res);
        if (rc != 0)
            goto out;
        ni = PQntuples(res);
        if (ni > STORE_UNAPPLIED_MAX) {
            err_set(err, err_len, "postgresql: ",
                    "more open orders hold these SKUs than the stock sync reads per batch");
            rc = SETTLE_ETOOBIG;
            goto out;
        }
        if (ni > 0) {
            list = calloc((size_t)ni, sizeof(*list));
            if (list == NULL) {
                rc = SETTLE_ENOMEM;
                goto out;
            }
        }
        for (int i = 0; i < ni; i++) {
            int64_t qty;
            rc = copy_id(&ss, list[i].order_id, sizeof(list[i].order_id), PQgetvalue(res, i, 0),
                         "order_items.order_id");
            if (rc == 0)
                rc = copy_id(&ss, list[i].sku, sizeof(list[i].sku), PQgetvalue(res, i, 1),
                             "order_items.sku");
            if (rc == 0)
                rc = column_int(&ss, res, i, 2, "order_items.qty", &qty);
            if (rc != 0)
                goto out;
            list[i].qty = qty > 0 && qty <= INT32_MAX ? (int32_t)qty : 0;
        }
    }
    rc = tx_commit(&ss);
    if (rc != 0)
        goto out;
    *n_rows = (size_t)nr;
    *items = list;
    *n_items = (size_t)ni;
    list = NULL;
out:
    free(list);
    free(skus);
    free(skus_lit);
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_stock_mismatches_work(struct store *s, const char *period,
                                const struct store_stock_mismatch *m, size_t n, char *err,
                                size_t err_len)
{
    struct int_texts on_hand = {0}, reserved = {0}, unapplied = {0}, before = {0}, after = {0};
    struct columns c = {0};
    int rc = 0;

    err_clear(err, err_len);
    if (s == NULL || period == NULL || (n > 0 && m == NULL))
        return SETTLE_EINVAL;
    if (n == 0)
        return 0;
    if (int_texts_make(&on_hand, n, &m[0].pg_on_hand, sizeof(m[0]), false) != 0 ||
        int_texts_make(&reserved, n, &m[0].reserved, sizeof(m[0]), false) != 0 ||
        int_texts_make(&unapplied, n, &m[0].unapplied, sizeof(m[0]), false) != 0 ||
        int_texts_make(&before, n, &m[0].redis_before, sizeof(m[0]), true) != 0 ||
        int_texts_make(&after, n, &m[0].redis_after, sizeof(m[0]), false) != 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    rc = cols_make(&c, 7, n);
    if (rc != 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        c.col[0][i] = m[i].sku;
        c.col[1][i] = on_hand.ptr[i];
        c.col[2][i] = reserved.ptr[i];
        c.col[3][i] = unapplied.ptr[i];
        c.col[4][i] = before.ptr[i];
        c.col[5][i] = after.ptr[i];
        c.col[6][i] = m[i].repaired ? "true" : "false";
    }
    /* One row per mismatched SKU; a repeated run keeps its first. */
    rc = record_columns(s,
                        "INSERT INTO stock_mismatches (period, sku, pg_on_hand, reserved, "
                        "unapplied, redis_before, redis_after, repaired) "
                        "SELECT $1::text, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], "
                        "$5::bigint[], $6::bigint[], $7::bigint[], $8::boolean[]) "
                        "ON CONFLICT (period, sku) DO NOTHING",
                        period, &c, n, err, err_len);
out:
    cols_free(&c);
    int_texts_free(&on_hand);
    int_texts_free(&reserved);
    int_texts_free(&unapplied);
    int_texts_free(&before);
    int_texts_free(&after);
    return rc;
}

/* The statistics of one UTC day, computed in one statement. $1 the date, $2 the run. */
#define DAILY_STATS_SELECT                                                                         \
    "WITH d AS (SELECT ($1::date)::timestamp AT TIME ZONE 'UTC' AS lo, "                           \
    "($1::date + 1)::timestamp AT TIME ZONE 'UTC' AS hi), "                                        \
    "c AS (SELECT count(*) AS created, "                                                           \
    "count(*) FILTER (WHERE o.status = 'REFUNDED') AS cancelled, "                                 \
    "count(*) FILTER (WHERE o.status = 'EXPIRED') AS expired, "                                    \
    "count(*) FILTER (WHERE o.status = 'FAILED') AS failed "                                       \
    "FROM orders o, d WHERE o.created_at >= d.lo AND o.created_at < d.hi), "                       \
    "k AS (SELECT count(*) AS completed, coalesce(sum(o.amount_minor), 0) AS revenue "             \
    "FROM orders o, d WHERE o.completed_at >= d.lo AND o.completed_at < d.hi), "                   \
    "r AS (SELECT count(*) AS n, coalesce(sum(r.amount_minor), 0) AS amount "                      \
    "FROM refunds r, d WHERE r.state = 'SUCCEEDED' AND r.updated_at >= d.lo "                      \
    "AND r.updated_at < d.hi) "                                                                    \
    "INSERT INTO daily_stats AS s (date, orders_created, orders_completed, revenue_minor, "        \
    "avg_order_minor, orders_cancelled, orders_expired, orders_failed, refunds_count, "            \
    "refunded_minor, computed_by) "                                                                \
    "SELECT $1::date, c.created, k.completed, k.revenue, "                                         \
    "CASE WHEN k.completed > 0 THEN round(k.revenue::numeric / k.completed)::bigint ELSE 0 END, "  \
    "c.cancelled, c.expired, c.failed, r.n, r.amount, $2::text FROM c, k, r "

int store_daily_stats_work(struct store *s, const char *date, bool force, bool dry_run,
                           const char *computed_by, struct store_daily_stats *out, bool *written,
                           char *err, size_t err_len)
{
    const char *params[2] = {date, computed_by};
    struct session ss = {0};
    PGresult *res = NULL;
    int rc;

    err_clear(err, err_len);
    if (written != NULL)
        *written = false;
    if (s == NULL || date == NULL || computed_by == NULL || out == NULL || written == NULL) {
        rc = SETTLE_EINVAL;
        goto out;
    }
    memset(out, 0, sizeof(*out));
    rc = session_begin(s, &ss, BEGIN_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* Is the date a finished UTC day? A day still running would be written once, early, and
     * never corrected. (A malformed date is refused by the cast.) */
    rc = exec_params(&ss, "SELECT $1::date < (now() AT TIME ZONE 'UTC')::date", 1, params, &res);
    if (rc != 0)
        goto out;
    if (strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
        err_set(err, err_len, "daily stats: ", "the date must be a finished UTC day");
        rc = SETTLE_EINVAL;
        goto out;
    }
    PQclear(res);
    res = NULL;
    if (force) {
        /* Recomputes the day and overwrites its row. */
        rc = exec_params(&ss,
                         DAILY_STATS_SELECT
                         "ON CONFLICT (date) DO UPDATE SET orders_created = "
                         "EXCLUDED.orders_created, orders_completed = EXCLUDED.orders_completed, "
                         "revenue_minor = EXCLUDED.revenue_minor, avg_order_minor = "
                         "EXCLUDED.avg_order_minor, orders_cancelled = EXCLUDED.orders_cancelled, "
                         "orders_expired = EXCLUDED.orders_expired, orders_failed = "
                         "EXCLUDED.orders_failed, refunds_count = EXCLUDED.refunds_count, "
                         "refunded_minor = EXCLUDED.refunded_minor, computed_at = now(), "
                         "computed_by = EXCLUDED.computed_by RETURNING 1",
                         2, params, &res);
    } else {
        /* Writes the day once; a row already there wins. */
        rc = exec_params(&ss, DAILY_STATS_SELECT "ON CONFLICT (date) DO NOTHING RETURNING 1", 2,
                         params, &res);
    }
    if (rc != 0)
        goto out;
    *written = PQntuples(res) > 0;
    PQclear(res);
    res = NULL;
    /* The row as stored now, for the run's summary. */
    rc = exec_params(&ss,
                     "SELECT to_char(date, 'YYYY-MM-DD'), orders_created, orders_completed, "
                     "revenue_minor, avg_order_minor, orders_cancelled, orders_expired, "
                     "orders_failed, refunds_count, refunded_minor, computed_by "
                     "FROM daily_stats WHERE date = $1::date",
                     1, params, &res);
    if (rc != 0)
        goto out;
    if (PQntuples(res) == 0) {
        err_set(err, err_len, "postgresql: ", "the daily_stats row vanished");
        rc = SETTLE_EINTERNAL;
        goto out;
    }
    copy_text(out->date, sizeof(out->date), PQgetvalue(res, 0, 0));
    int64_t *fields[9] = {&out->orders_created,  &out->orders_completed, &out->revenue_minor,
                          &out->avg_order_minor, &out->orders_cancelled, &out->orders_expired,
                          &out->orders_failed,   &out->refunds_count,    &out->refunded_minor};
    for (int k = 0; k < 9 && rc == 0; k++)
        rc = column_int(&ss, res, 0, k + 1, "daily_stats", fields[k]);
    if (rc != 0)
        goto out;
    copy_text(out->computed_by, sizeof(out->computed_by), PQgetvalue(res, 0, 10));
    /* A dry run leaves the transaction open: session_close rolls it back. */
    if (!dry_run)
        rc = tx_commit(&ss);
    if (rc != 0)
        *written = false;
out:
    PQclear(res);
    session_close(&ss);
    return rc;
}

int store_daily_stats_last_work(struct store *s, const char *before, char out[11], bool *found,
                                char *err, size_t err_len)
{
    const char *params[1] = {before};
    struct session ss = {0};
    PGresult *res = NULL;
    int rc;

    err_clear(err, err_len);
    if (s == NULL || before == NULL || out == NULL || found == NULL)
        return SETTLE_EINVAL;
    *found = false;
    out[0] = '\0';
    rc = session_begin(s, &ss, BEGIN_READ_SQL, err, err_len);
    if (rc != 0)
        goto out;
    /* By the date primary key: one index probe. */
    rc = exec_params(&ss, "SELECT max(date)::text FROM daily_stats WHERE date < $1::date", 1,
                     params, &res);
    if (rc == 0 && !PQgetisnull(res, 0, 0)) {
        if (copy_text(out, 11, PQgetvalue(res, 0, 0))) {
            err_set(err, err_len, "postgresql: ", "unexpected date in daily_stats");
            rc = SETTLE_EPARSE;
        } else {
            *found = true;
        }
    }
    if (rc == 0)
        rc = tx_commit(&ss);
out:
    PQclear(res);
    session_close(&ss);
    return rc;
}
