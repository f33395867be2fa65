/* http1.c - the HTTP/1.1 activator: health checks answered while the service sleeps, real
 * requests wake it and are relayed in order (activators/http1/README.md for the design).
 *
 * Written with the C SDK (activators/sdk/c/fabricd.h) and its HTTP/1.1 framing helper
 * (fab_http1.h) as the worked example of a protocol-aware stream activator. Every client
 * connection is framed in both directions for its whole life (never spliced, except after
 * a 101 Switching Protocols), so the guest knows when a connection is idle and the port's
 * need can drop to none under open keep-alive connections.
 */
#define FAB_OUT_CAP (640 * 1024) /* relayed bytes of a full batch plus local answers */
#include "../sdk/c/fabricd.h"
#include "../sdk/c/fab_http1.h"

#define MAX_CONNS 1024
#define SMALL 2048                 /* client bytes kept inline per connection */
#define BIG (160 * 1024)           /* a pool block: the pause threshold plus two host reads */
#define BIG_MARGIN (1536 * 1024)  /* memory left under the cap (event buffers the host grows) */
#define DEFAULT_MEMORY (16u << 20) /* the host's default memory_limit */
#define MAXQ 32                    /* pipelined requests per connection awaiting answers */
#define MAX_HEALTH 8
#define STAGE (64 * 1024)
#define MAX_LOCAL_PER_CALL 512 /* local answers per call: bounds the fuel a call takes */
#define ANSWER_ROOM (STAGE + 64 * 1024) /* kept free in a call's answer for relayed bytes */

/* FIFO entries: what answers each request, in request order */
#define Q_RELAY 0x80u  /* the backend answers it */
#define Q_HEAD 0x40u   /* a HEAD request: the answer has no body */
#define Q_CLOSE 0x20u  /* close the connection after its answer */
#define Q_REAL 0x10u   /* a relayed request that needs the backend (not a health check) */
#define Q_INDEX 0x0fu  /* local: a health entry, or an error below */
#define Q_KA 0x100u    /* an HTTP/1.0 keep-alive request: say keep-alive */
#define Q_ERR 8u       /* local errors: Q_ERR + index into err_status */
static const u32 err_status[] = {400, 431, 501, 505, 503, 502, 413, 408};
enum { E400, E431, E501, E505, E503, E502, E413, E408 };

enum { UP_NONE, UP_CONNECTING, UP_READY };

struct conn {
    u32 sid;
    u8 up;
    u8 paused;
    u8 client_eof;   /* stream_close seen: serve what was read, then close */
    u8 stop;         /* read no more requests (a close was asked for, or an error) */
    u8 stop_after;   /* stop once the current request's body is read */
    u8 waiting;      /* a relayed request is held until the upstream connects */
    u8 in_body;      /* the client side is in a request body */
    u8 body_relay;   /* ... that goes upstream (else it is dropped) */
    u8 body_real;
    u8 resp_body;    /* the backend side is in a response body */
    u8 resp_started; /* bytes of the current response went to the client */
    u8 busy;         /* counted in nbusy (the need) */
    u8 spliced;
    u8 backlog;      /* local answers were cut short by a full answer: go on at a tick */
    u8 upgrading;    /* an Upgrade request went upstream: read nothing until its answer */
    u8 lost;         /* bytes of it did not fit a call's answer: LOST_DOWN / LOST_UP */
    u8 nq, qhead, nreal;
    u16 q[MAXQ];
    u32 scan, rscan;
    u64 held_since;
    u64 head_since;  /* a tick saw part of a request head, the rest still to come */
    struct fab_h1_body rb, sb;
    struct fab_buf in;  /* client bytes not yet consumed: SMALL inline or a BIG block */
    u8 *in_big;
    struct fab_buf rin; /* backend bytes of an incomplete response head (a BIG block) */
    u8 small[SMALL];
};

struct health {
    u8 method[16];
    u32 mlen;
    u8 path[256];
    u32 plen;
    u32 status;
    u8 body[512];
    u32 blen;
    u8 ctype[64];
    u32 clen;
};

FAB_TABLE(conns, struct conn, MAX_CONNS);
/* Big blocks are made on first need, up to what the instance's memory_limit leaves
 * room for (init), and pooled: idle ports stay small, a larger activator_memory_mib
 * holds more uploads at once. A free block's first bytes link it to the next. */
static u8 *big_free;
static u32 big_made, big_max;

static u8 *big_get(void) {
    u8 *b = big_free;
    if (b) {
        fab_copy(&big_free, b, sizeof big_free);
        return b;
    }
    if (big_made >= big_max) return 0;
    u32 p = fab_alloc(BIG);
    if (!p) return 0;
    big_made++;
    return (u8 *)p;
}

static void big_put(u8 *b) {
    fab_copy(b, &big_free, sizeof big_free);
    big_free = b;
}

static struct health health[MAX_HEALTH];
static u32 nhealth;
static u32 hold_timeout_ms = 30000;
static u32 head_timeout_ms = 30000;
static u32 retry_after_s = 5;
static u32 hold_soft = 16 * 1024;
static u32 local_when_ready;
static u32 nbusy, busy_since_tick, level;
static u32 warned_bufs;
static u32 local_this_call;

/* Counters, summed and sent at a tick (every 100 ms while a connection is open) or when
 * the last connection ends: one action per name and tick, not one per request (the host
 * reads a bounded number of actions per call, and decodes each). */
enum { C_HEALTH, C_HEALTH_RELAYED, C_REQUESTS, C_RESPONSES, C_BAD_REQ, C_BAD_RESP, C_502,
       C_TIMEOUTS, C_BUFS, C_REFUSED, C_UPGRADED, C_HEAD_TIMEOUTS, C_OVERFLOW, C_N };
static const char *const cnames[C_N] = {
    "health_answered", "health_relayed", "requests", "responses", "bad_requests",
    "bad_responses", "bad_gateway", "hold_timeouts", "buffers_exhausted", "conns_refused",
    "upgraded", "head_timeouts", "answer_overflows"};
static u32 counts[C_N];
static u32 counts_due;
#define COUNT(k) (counts[(k)]++)

/* ------------------------------------------------------------ staging of sends */

/* One pending send per direction: many small pieces of one stream become one action
 * (the host reads a bounded number of actions per call). */
struct stage {
    u32 sid;
    u32 len;
    int up;
    u8 buf[STAGE];
};
static struct stage cst, ust; /* zeroed (bss): init sets the rest */

#define LOST_DOWN 1 /* toward the client: its response is cut */
#define LOST_UP 2   /* toward the backend: its request is cut */
static struct conn *get(u32 sid);

/* A send that did not fit this call's answer. Unreachable while the host keeps its
 * promises (ABI.md: at most 64 KiB of stream bytes a call, one read past a pause; the
 * local answers are bounded by ANSWER_ROOM): if it is broken, the bytes are gone, so the
 * stream they belonged to cannot go on as a byte stream. It is closed with HTTP's error
 * (service(): 503 if no response was under way, else a close that cuts the response)
 * rather than left to hand the peer a request or response with a hole in it. */
static void send_lost(struct stage *s, u32 sid) {
    struct conn *c = get(sid);
    COUNT(C_OVERFLOW);
    if (!warned_bufs++) fab_log(FAB_ERROR, "http1: answer buffer full; stream closed");
    if (c) c->lost |= s->up ? LOST_UP : LOST_DOWN;
}

static void stage_flush(struct stage *s) {
    if (!s->len) return;
    int r = s->up ? fab_upstream_send(s->sid, s->buf, s->len) : fab_send(s->sid, s->buf, s->len);
    s->len = 0;
    if (r) send_lost(s, s->sid);
}

static void stage_put(struct stage *s, u32 sid, const u8 *p, u32 n) {
    if (!n) return;
    if (s->sid != sid) { stage_flush(s); s->sid = sid; }
    if (n > STAGE - s->len) {
        stage_flush(s);
        if (n > STAGE / 4) {
            int r = s->up ? fab_upstream_send(sid, p, n) : fab_send(sid, p, n);
            if (r) send_lost(s, sid);
            return;
        }
    }
    fab_copy(s->buf + s->len, p, n);
    s->len += n;
}

static void flush_all(void) { stage_flush(&cst); stage_flush(&ust); }
static void cout(struct conn *c, const u8 *p, u32 n) { stage_put(&cst, c->sid, p, n); }
static void uout(struct conn *c, const u8 *p, u32 n) { stage_put(&ust, c->sid, p, n); }

/* ------------------------------------------------------------ config */

static int copy_str(struct fab_json obj, const char *key, u8 *out, u32 cap, u32 *len,
                    const char *dflt) {
    struct fab_json v = fab_json_get(obj, key);
    if (!fab_json_present(v)) {
        *len = fab_strlen(dflt);
        fab_copy(out, dflt, *len);
        return 0;
    }
    i32 n = fab_json_str(v, out, cap);
    if (n < 0) return -1;
    *len = (u32)n;
    return 0;
}

static int init(struct fab_json cfg) {
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    head_timeout_ms = fab_cfg_u32(cfg, "head_timeout_ms", 30000);
    retry_after_s = fab_cfg_u32(cfg, "retry_after_s", 5);
    hold_soft = fab_cfg_u32(cfg, "stream_hold_bytes", 16 * 1024);
    u32 mem = fab_cfg_u32(cfg, "memory_limit", DEFAULT_MEMORY);
    u32 top = fab_alloc(0);  /* the heap's end: statics and what exists already */
    u32 room = mem > top + BIG_MARGIN ? mem - top - BIG_MARGIN : 0;
    big_max = big_made + room / BIG;
    if (big_max < 1) big_max = 1;
    if (hold_soft < FAB_H1_MAX_HEAD) hold_soft = FAB_H1_MAX_HEAD;
    if (hold_soft > BIG - 128 * 1024) hold_soft = BIG - 128 * 1024;
    local_when_ready = (u32)fab_cfg_bool(cfg, "health_local_when_ready", 0);
    nbusy = busy_since_tick = level = warned_bufs = 0;
    cst.sid = ust.sid = FAB_NIL;
    cst.len = ust.len = 0;
    ust.up = 1;
    fab_table_clear(&conns);
    struct fab_json list = fab_json_get(cfg, "health"), e;
    nhealth = 0;
    if (!fab_json_present(list)) {
        struct health *h = &health[0];
        fab_copy(h->method, "GET", 3); h->mlen = 3;
        fab_copy(h->path, "/healthz", 8); h->plen = 8;
        h->status = 200;
        fab_copy(h->body, "ok\n", 3); h->blen = 3;
        fab_copy(h->ctype, "text/plain", 10); h->clen = 10;
        nhealth = 1;
        return 0;
    }
    if (list.len < 1 || list.p[0] != '[') { fab_log(FAB_ERROR, "http1: health: not a list"); return 1; }
    for (u32 it = 0; fab_json_next(list, &it, &e);) {
        if (nhealth == MAX_HEALTH) { fab_log(FAB_ERROR, "http1: health: at most 8 entries"); return 1; }
        struct health *h = &health[nhealth];
        if (copy_str(e, "method", h->method, sizeof h->method, &h->mlen, "GET")
            || copy_str(e, "path", h->path, sizeof h->path, &h->plen, "")
            || copy_str(e, "body", h->body, sizeof h->body, &h->blen, "ok\n")
            || copy_str(e, "content_type", h->ctype, sizeof h->ctype, &h->clen, "text/plain")) {
            fab_logf(FAB_ERROR, "http1: health[%u]: method (16), path (256), body (512) and "
                     "content_type (64) are strings of at most that many bytes", nhealth);
            return 1;
        }
        h->status = fab_json_u32(fab_json_get(e, "status"), 200);
        if (!h->plen || h->path[0] != '/' || h->status < 200 || h->status > 599 || !h->mlen) {
            fab_logf(FAB_ERROR, "http1: health[%u]: needs a path starting with / and a status "
                     "200-599", nhealth);
            return 1;
        }
        for (u32 k = 0; k < h->mlen; k++)
            if (!fab_h1_tchar(h->method[k])) { fab_log(FAB_ERROR, "http1: health: bad method"); return 1; }
        for (u32 k = 0; k < h->clen; k++)
            if (h->ctype[k] < 32 || h->ctype[k] == 127) { fab_log(FAB_ERROR, "http1: health: bad content_type"); return 1; }
        nhealth++;
    }
    return 0;
}

/* ------------------------------------------------------------ buffers */

static void in_release(struct conn *c) {
    if (c->in_big) big_put(c->in_big);
    c->in_big = 0;
    fab_buf_init(&c->in, c->small, SMALL);
}

/* Append client bytes to the connection's hold; -1 when no buffer can take them. */
static int in_put(struct conn *c, const u8 *p, u32 n) {
    if (!n) return 0;
    if (n > fab_buf_room(&c->in)) {
        if (c->in_big || c->in.len + n > BIG) return -1;
        u8 *b = big_get();
        if (!b) return -1;
        fab_copy(b, c->in.data, c->in.len);
        u32 len = c->in.len;
        fab_buf_init(&c->in, b, BIG);
        c->in.len = len;
        c->in_big = b;
    }
    return fab_buf_put(&c->in, p, n);
}

static void in_take(struct conn *c, u32 n) {
    fab_buf_take(&c->in, n);
    if (c->in_big && c->in.len <= SMALL) {
        u32 len = c->in.len;
        fab_copy(c->small, c->in.data, len);
        big_put(c->in_big);
        c->in_big = 0;
        fab_buf_init(&c->in, c->small, SMALL);
        c->in.len = len;
    }
}

static void rin_release(struct conn *c) {
    if (c->rin.data) big_put(c->rin.data);
    c->rin.data = 0;
    c->rin.len = c->rin.cap = 0;
}

/* ------------------------------------------------------------ answers */

static void put_local(struct conn *c, u32 e) {
    u8 o[1400];
    u8 extra[200];
    u32 x = 0, idx = e & Q_INDEX;
    int close = (e & Q_CLOSE) != 0, head = (e & Q_HEAD) != 0;
    if (idx < Q_ERR) {
        const struct health *h = &health[idx];
        x = fab_h1_puts(extra, x, "Content-Type: ");
        x = fab_h1_put(extra, x, h->ctype, h->clen);
        x = fab_h1_puts(extra, x, "\r\nCache-Control: no-store\r\n");
        if (close) x = fab_h1_puts(extra, x, "Connection: close\r\n");
        else if (e & Q_KA) x = fab_h1_puts(extra, x, "Connection: keep-alive\r\n");
        cout(c, o, fab_h1_answer(o, h->status, extra, x, h->body, h->blen, head));
        return;
    }
    u32 st = err_status[idx - Q_ERR];
    x = fab_h1_puts(extra, x, "Content-Type: text/plain\r\n");
    if (st == 503) {
        x = fab_h1_puts(extra, x, "Retry-After: ");
        x = fab_h1_putu(extra, x, retry_after_s);
        x = fab_h1_puts(extra, x, "\r\n");
    }
    x = fab_h1_puts(extra, x, "Connection: close\r\n");
    const char *why = st == 503 ? "no backend became ready in time\n" : fab_h1_reason(st);
    u32 wl = fab_strlen(why);
    cout(c, o, fab_h1_answer(o, st, extra, x, (const u8 *)why, wl, head));
}

static void push(struct conn *c, u32 e) {
    c->q[(c->qhead + c->nq) % MAXQ] = (u16)e;
    c->nq++;
    if (e & Q_REAL) c->nreal++;
}

static void pop(struct conn *c) {
    if (c->q[c->qhead] & Q_REAL) c->nreal--;
    c->qhead = (u8)((c->qhead + 1) % MAXQ);
    c->nq--;
}

/* Answer locally what stands at the head of the FIFO (nothing before it is unanswered). */
static void drain(struct conn *c) {
    while (c->nq && !(c->q[c->qhead] & Q_RELAY)) {
        u32 e = c->q[c->qhead];
        put_local(c, e);
        pop(c);
        if (e & Q_CLOSE) { c->stop = 1; c->nq = 0; c->nreal = 0; }
    }
}

/* An error for the request being read: answered in its turn, then the connection closes. */
static void fail(struct conn *c, u32 err, int head) {
    push(c, Q_ERR + err + Q_CLOSE + (head ? Q_HEAD : 0));
    c->stop = 1;
    c->in_body = 0;
    c->in.len = 0;
}

/* ------------------------------------------------------------ requests */

static int health_match(const struct fab_h1_msg *m, int *head) {
    u32 tl = m->target_len;
    for (u32 k = 0; k < tl; k++)
        if (m->target[k] == '?') { tl = k; break; }
    for (u32 i = 0; i < nhealth; i++) {
        const struct health *h = &health[i];
        if (tl != h->plen || !fab_memeq(m->target, h->path, tl)) continue;
        if (m->method_len == h->mlen && fab_memeq(m->method, h->method, h->mlen)) {
            *head = m->method_len == 4 && fab_memeq(m->method, "HEAD", 4);
            return (int)i;
        }
        if (h->mlen == 3 && fab_memeq(h->method, "GET", 3) && m->method_len == 4
            && fab_memeq(m->method, "HEAD", 4)) {
            *head = 1;
            return (int)i;
        }
    }
    return -1;
}

static void connect(struct conn *c) {
    if (c->up != UP_NONE || !fab_backend_ready()) return;
    c->up = UP_CONNECTING;
    fab_connect(c->sid, 0);
}

/* Frame client bytes: answer, relay or hold. Returns how many were consumed; the rest
 * waits (held for a backend, the pipeline full, or an incomplete head). */
static u32 pump(struct conn *c, const u8 *p, u32 n) {
    u32 i = 0;
    while (i < n && !c->stop) {
        if (c->in_body) {
            u32 k = fab_h1_body(&c->rb, p + i, n - i);
            if (c->body_relay) uout(c, p + i, k);
            i += k;
            if (c->rb.err) {
                COUNT(C_BAD_REQ);
                if (c->body_relay) { /* the backend has half a request: nothing can follow */
                    flush_all();
                    fab_upstream_close(c->sid);
                    c->up = UP_NONE;
                    c->nq = 0;
                    c->nreal = 0;
                }
                fail(c, E400, 0);
                return n;
            }
            if (c->rb.done) {
                c->in_body = 0;
                if (c->stop_after) c->stop = 1;
            }
            continue;
        }
        if (c->nq >= MAXQ - 1 || c->upgrading) break; /* wait for answers (a slot kept for an error) */
        u32 hl = fab_h1_head_len(p + i, n - i, &c->scan);
        if (!hl) {
            if (n - i >= FAB_H1_MAX_HEAD) { COUNT(C_BAD_REQ); fail(c, E431, 0); return n; }
            break;
        }
        struct fab_h1_msg m;
        if (hl > FAB_H1_MAX_HEAD) { COUNT(C_BAD_REQ); fail(c, E431, 0); return n; }
        int err = fab_h1_request(p + i, hl, &m);
        int is_head = m.method_len == 4 && fab_memeq(m.method, "HEAD", 4);
        if (!err && m.method_len == 7 && fab_memeq(m.method, "CONNECT", 7)) err = 501;
        if (err) {
            COUNT(C_BAD_REQ);
            fail(c, err == 501 ? E501 : err == 505 ? E505 : E400, is_head);
            return n;
        }
        int hhead = 0, h = health_match(&m, &hhead);
        int local = h >= 0 && (!fab_backend_ready() || local_when_ready);
        u32 close = (m.flags & FAB_H1_CLOSE) ? Q_CLOSE : 0;
        if (local && (fab_room() < ANSWER_ROOM || local_this_call >= MAX_LOCAL_PER_CALL)) {
            c->backlog = 1; /* this call's answer is nearly full: go on at the next tick */
            break;
        }
        if (local) {
            /* a local answer to a request with a body the client may still be waiting
             * to send (Expect: 100-continue): close after it, the framing is moot */
            if ((m.flags & FAB_H1_EXPECT_100) && ((m.flags & FAB_H1_CHUNKED) || m.length))
                close = Q_CLOSE;
            u32 ka = m.minor == 0 && (m.flags & FAB_H1_KEEPALIVE) ? Q_KA : 0;
            push(c, (u32)h + close + ka + (hhead ? Q_HEAD : 0));
            COUNT(C_HEALTH);
            local_this_call++;
            c->body_relay = 0;
        } else {
            u32 real = h >= 0 ? 0 : Q_REAL;
            if (c->up != UP_READY) {
                /* hold: the head stays unconsumed until the upstream is there */
                if (!c->waiting) { c->waiting = 1 + (real ? 1 : 0); c->held_since = fab_now(); }
                if (real) c->waiting = 2;
                connect(c);
                break;
            }
            c->waiting = 0;
            push(c, Q_RELAY + real + close + (is_head ? Q_HEAD : 0));
            if (real) COUNT(C_REQUESTS);
            else COUNT(C_HEALTH_RELAYED);
            u32 lead = 0; /* empty lines before the request line (RFC 9112 §2.2): dropped */
            while (lead + 1 < hl && p[i + lead] == '\r' && p[i + lead + 1] == '\n') lead += 2;
            uout(c, p + i + lead, hl - lead);
            c->body_relay = 1;
            c->body_real = real != 0;
            if (m.flags & FAB_H1_UPGRADE) c->upgrading = 1;
        }
        i += hl;
        c->scan = 0;
        fab_h1_body_start(&c->rb, &m, 0);
        c->in_body = !c->rb.done;
        if (close) {
            if (c->in_body) c->stop_after = 1;
            else c->stop = 1;
        }
        drain(c);
    }
    return i;
}

/* ------------------------------------------------------------ connection lifecycle */

static void account(struct conn *c, int busy) {
    if (busy && !c->busy) nbusy++;
    if (!busy && c->busy) nbusy--;
    c->busy = (u8)busy;
}

static void forget(struct conn *c) {
    account(c, 0);
    in_release(c);
    rin_release(c);
    fab_table_del(&conns, c);
}

static void close_conn(struct conn *c) {
    flush_all();
    /* the upstream first: the host ends the stream at a downstream_close once its
     * upstream is closed, and would not know the id any more */
    if (c->up != UP_NONE) fab_upstream_close(c->sid);
    fab_close(c->sid);
    forget(c);
}

/* After every event of a connection: consume what is held, answer, pause or close. */
/* A connection with bytes lost (send_lost): 1 when it is closed (or waits for a call with
 * room to close in), 0 when it goes on to answer 503 and close. */
static int lost_end(struct conn *c) {
    flush_all();
    /* the closes (and a 503) need room: in a later call (a tick) if this one is full */
    if (fab_room() < 1024) { c->backlog = 1; return 1; }
    if (c->up != UP_NONE) { fab_upstream_close(c->sid); c->up = UP_NONE; }
    rin_release(c);
    if ((c->lost & LOST_DOWN) || c->resp_started) { close_conn(c); return 1; }
    /* the backend got a cut request: nothing it answers could be relayed */
    c->lost = 0;
    c->nq = 0;
    c->nreal = 0;
    c->resp_body = 0;
    c->waiting = 0;
    fail(c, E503, 0);
    return 0;
}

static void service(struct conn *c) {
    if (c->lost && !c->spliced && lost_end(c)) return;
    if (c->spliced) return;
    if (c->in.len && !c->stop) {
        u32 k = pump(c, c->in.data, c->in.len);
        if (!c->stop) in_take(c, k);
    }
    if (c->lost && lost_end(c)) return;  /* what pump relayed did not fit */
    if (c->stop) c->in.len = 0;
    drain(c);
    int idle = !c->nq && !c->in_body && !c->waiting;
    if ((c->stop && !c->nq) || (c->client_eof && (idle || c->in_body))) {
        close_conn(c);
        return;
    }
    int want_pause = c->in.len >= hold_soft || c->nq >= MAXQ - 1;
    if (want_pause && !c->paused) { fab_pause(c->sid); c->paused = 1; }
    if (!want_pause && c->paused) { fab_resume(c->sid); c->paused = 0; }
    account(c, c->waiting == 2 || c->nreal || (c->in_body && c->body_real));
}

static struct conn *get(u32 sid) { return fab_table_get(&conns, sid); }

static void on_open(u32 sid, u32 port) {
    (void)port;
    struct conn *c = fab_table_add(&conns, sid);
    if (!c) {
        u8 o[256];
        static const char x[] = "Retry-After: 1\r\nConnection: close\r\n";
        COUNT(C_REFUSED);
        fab_send(sid, o, fab_h1_answer(o, 503, (const u8 *)x, sizeof x - 1,
                                       (const u8 *)"too many connections\n", 21, 0));
        fab_close(sid);
        return;
    }
    c->sid = sid;
    fab_buf_init(&c->in, c->small, SMALL);
}

static void on_data(u32 sid, const u8 *d, u32 n) {
    struct conn *c = get(sid);
    if (!c || c->stop || c->spliced || c->lost) return; /* after an error: the rest is dropped */
    if (c->in.len == 0) { /* the common case: frame the read in place */
        u32 k = pump(c, d, n);
        if (!c->stop && in_put(c, d + k, n - k)) goto nobuf;
    } else if (in_put(c, d, n)) {
        goto nobuf;
    }
    service(c);
    return;
nobuf:
    if (!warned_bufs++) fab_log(FAB_WARNING, "http1: hold buffers exhausted; answering 503");
    COUNT(C_BUFS);
    if (c->nq < MAXQ) fail(c, E503, 0);
    c->waiting = 0;
    service(c);
}

static void on_close(u32 sid) {
    struct conn *c = get(sid);
    if (!c) return;
    if (c->spliced) { forget(c); return; }
    c->client_eof = 1;
    service(c);
}

static void on_result(u32 sid, int ok) {
    struct conn *c = get(sid);
    if (!c || c->up != UP_CONNECTING) return;
    if (!ok) { c->up = UP_NONE; return; } /* retried at backend_available or a tick */
    c->up = UP_READY;
    service(c); /* relays what was held */
}

/* The backend ended its side: close-delimited responses end here; a response cut short,
 * or requests it never answered, get 502; an idle connection just loses its upstream. */
static void on_upstream_close(u32 sid) {
    struct conn *c = get(sid);
    if (!c) return;
    if (c->spliced) { close_conn(c); return; }
    flush_all();
    if (c->up != UP_NONE) fab_upstream_close(sid);
    c->up = UP_NONE;
    rin_release(c);
    int eof_body = c->resp_body && fab_h1_body_to_eof(&c->sb);
    c->resp_body = 0;
    c->rscan = 0;
    if (c->nq && (c->q[c->qhead] & Q_RELAY)) {
        if (eof_body || c->resp_started) {
            if (eof_body) COUNT(C_RESPONSES);
            close_conn(c);
            return;
        }
        c->nq = 0; /* everything after the unanswered request was sent to that backend */
        c->nreal = 0;
        COUNT(C_502);
        fail(c, E502, 0);
    }
    service(c);
}

/* Frame backend bytes and relay them; at each response's end, answer what follows. */
static u32 pump_backend(struct conn *c, const u8 *p, u32 n, int *bad) {
    u32 i = 0;
    while (i < n) {
        if (c->resp_body) {
            u32 k = fab_h1_body(&c->sb, p + i, n - i);
            cout(c, p + i, k);
            i += k;
            if (c->sb.err) { *bad = 1; return i; }
            if (c->sb.done) {
                c->resp_body = 0;
                c->resp_started = 0;
                u32 e = c->q[c->qhead];
                pop(c);
                COUNT(C_RESPONSES);
                if (e & Q_CLOSE) { c->stop = 1; c->nq = 0; c->nreal = 0; return n; }
                drain(c);
            }
            continue;
        }
        u32 hl = fab_h1_head_len(p + i, n - i, &c->rscan);
        if (!hl || hl > FAB_H1_MAX_HEAD) {
            if (n - i >= FAB_H1_MAX_HEAD) *bad = 1;
            return i;
        }
        struct fab_h1_msg m;
        if (fab_h1_response(p + i, hl, &m) || !c->nq || !(c->q[c->qhead] & Q_RELAY)) {
            *bad = 1;
            return i;
        }
        c->rscan = 0;
        cout(c, p + i, hl);
        i += hl;
        if (m.status == 101) { /* the connection is another protocol's now: the kernel relays */
            cout(c, p + i, n - i);
            flush_all();
            if (c->paused) { fab_resume(c->sid); c->paused = 0; }
            if (c->in.len) uout(c, c->in.data, c->in.len);
            flush_all();
            fab_splice(c->sid);
            COUNT(C_UPGRADED);
            c->spliced = 1;
            account(c, 1);
            return n;
        }
        if (m.status < 200) continue; /* 100 Continue and other interim answers */
        c->resp_started = 1;
        fab_h1_body_start(&c->sb, &m, (c->q[c->qhead] & Q_HEAD) != 0);
        if (m.flags & FAB_H1_CLOSE) c->q[c->qhead] |= Q_CLOSE;
        c->upgrading = 0;
        c->resp_body = 1;
        if (c->sb.done) { /* no body */
            c->resp_body = 0;
            c->resp_started = 0;
            u32 e = c->q[c->qhead];
            pop(c);
            COUNT(C_RESPONSES);
            if (e & Q_CLOSE) { c->stop = 1; c->nq = 0; c->nreal = 0; return n; }
            drain(c);
        }
    }
    return i;
}

static void on_upstream_data(u32 sid, const u8 *d, u32 n) {
    struct conn *c = get(sid);
    if (!c || c->spliced || c->up != UP_READY || c->lost) return;
    int bad = 0;
    if (!c->rin.len) {
        u32 k = pump_backend(c, d, n, &bad);
        if (!bad && k < n && !c->stop) {
            c->rin.data = big_get();
            if (!c->rin.data) bad = 1;
            else { c->rin.cap = BIG; c->rin.len = 0; fab_buf_put(&c->rin, d + k, n - k); }
        }
    } else {
        if (fab_buf_put(&c->rin, d, n)) bad = 1;
        else {
            u32 k = pump_backend(c, c->rin.data, c->rin.len, &bad);
            fab_buf_take(&c->rin, k);
            if (!c->rin.len) rin_release(c);
        }
    }
    if (bad && !c->nq) {
        /* bytes no request asked for (a server's 408 before it closes an idle
         * connection): the upstream is dropped, the client's connection stays */
        flush_all();
        fab_upstream_close(sid);
        c->up = UP_NONE;
        rin_release(c);
        c->rscan = 0;
        bad = 0;
    }
    if (bad) {
        COUNT(C_BAD_RESP);
        if (c->resp_started) { close_conn(c); return; }
        flush_all();
        fab_upstream_close(sid);
        c->up = UP_NONE;
        rin_release(c);
        c->nq = 0;
        c->nreal = 0;
        fail(c, E502, 0);
    }
    if (c->stop) rin_release(c);
    service(c);
}

static void on_available(void) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));)
        if (c->waiting) connect(c);
}

static void on_unavailable(void) {
    struct conn *c; /* a held health check may be answered locally again */
    for (u32 it = 0; (c = fab_table_next(&conns, &it));)
        if (c->waiting == 1 && c->up == UP_NONE) service(c);
}

/* Slowloris: part of a request head read and the rest not coming (a byte a second keeps
 * a connection, and the connections are 1,024). Such a head is answered 408 and the
 * connection closed once head_timeout_ms have passed since a tick first saw it. Only
 * with nothing else in the connection's pipeline: a head behind requests still being
 * answered, or held for a backend, or after an upgrade, is waiting, not slow. */
static int head_timed_out(struct conn *c, u64 now) {
    if (!c->in.len || c->waiting || c->in_body || c->stop || c->upgrading || c->nq
        || c->client_eof) {
        c->head_since = 0;
        return 0;
    }
    if (!c->head_since) { c->head_since = now ? now : 1; return 0; }
    if (now - c->head_since < head_timeout_ms) return 0;
    COUNT(C_HEAD_TIMEOUTS);
    fail(c, E408, 0);
    service(c);
    return 1;
}

static void on_tick(u64 now) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));) {
        if (c->lost || (c->backlog && local_this_call < MAX_LOCAL_PER_CALL)) {
            c->backlog = 0;
            service(c);
            continue;
        }
        if (head_timed_out(c, now)) continue;
        if (!c->waiting) continue;
        if (c->held_since == 0) c->held_since = now; /* opened before the first tick */
        if (now - c->held_since >= hold_timeout_ms) {
            COUNT(C_TIMEOUTS);
            c->waiting = 0;
            fail(c, E503, 0);
            if (c->up != UP_NONE) { flush_all(); fab_upstream_close(c->sid); c->up = UP_NONE; }
            service(c);
        } else {
            connect(c);
        }
    }
    counts_due = 1;
    if (!nbusy && !busy_since_tick) level = FAB_NEED_NONE;
    busy_since_tick = nbusy != 0;
}

static void batch_begin(void) { local_this_call = 0; }

static void batch_end(void) {
    flush_all();
    if (counts_due || !fab_table_count(&conns)) {
        for (u32 k = 0; k < C_N; k++)
            if (counts[k]) { fab_count(cnames[k], counts[k]); counts[k] = 0; }
        counts_due = 0;
    }
    if (nbusy) { level = FAB_NEED_ACTIVE; busy_since_tick = 1; }
    else if (!fab_table_count(&conns)) level = FAB_NEED_NONE; /* no ticks come then */
    fab_need(level);
}

static const struct fab_handlers H = {
    .init = init,
    .batch_begin = batch_begin,
    .stream_open = on_open,
    .stream_data = on_data,
    .stream_close = on_close,
    .upstream_result = on_result,
    .upstream_data = on_upstream_data,
    .upstream_close = on_upstream_close,
    .backend_available = on_available,
    .backend_unavailable = on_unavailable,
    .tick = on_tick,
    .batch_end = batch_end,
};

FAB_STREAM_ACTIVATOR(H)
