/* {{name}}: a stream activator written with fabricd's C SDK (fabricd.h).
 *
 * The fabric terminates the service port's TCP connections and hands the bytes to this
 * module. A new connection wakes the service and is paused (its bytes wait in the
 * client's kernel); once a backend is ready it is connected upstream, resumed and spliced
 * (the kernel relays it from then on). Connections held longer than hold_timeout_ms (the
 * service's hold.timeout, added to the config by the host) are closed. need is active
 * while any connection is open (an open connection to an unknown protocol may be busy).
 */
#include "fabricd.h"

enum { HOLDING = 1, CONNECTING, SPLICED };

struct conn {
    u32 state;
    u64 opened_ms;
};

FAB_TABLE(conns, struct conn, 4096);
static u32 hold_timeout_ms = 30000;

static int init(struct fab_json cfg) {
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    return 0;
}

static void connect(u32 sid, struct conn *c) {
    c->state = CONNECTING;
    fab_connect(sid, 0); /* 0: the port's target_port */
}

static void on_open(u32 sid, u32 port) {
    (void)port;
    struct conn *c = fab_table_add(&conns, sid);
    if (!c) {
        fab_close(sid); /* table full */
        return;
    }
    c->state = HOLDING;
    c->opened_ms = fab_now();
    fab_pause(sid);
    if (fab_backend_ready()) connect(sid, c);
}

static void on_result(u32 sid, int ok) {
    struct conn *c = fab_table_get(&conns, sid);
    if (!c || c->state != CONNECTING) return;
    if (!ok) {
        c->state = HOLDING; /* retried on the next tick */
        return;
    }
    fab_resume(sid);
    fab_splice(sid);
    c->state = SPLICED;
}

static void on_close(u32 sid) {
    struct conn *c = fab_table_get(&conns, sid);
    if (c && c->state == SPLICED) fab_table_del(&conns, c); /* the pair ended */
}

static void on_upstream_close(u32 sid) {
    struct conn *c = fab_table_get(&conns, sid);
    if (!c || c->state == SPLICED) return;
    fab_close(sid);
    fab_table_del(&conns, c);
}

static void connect_held(void) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));)
        if (c->state == HOLDING) connect(fab_table_key(&conns, c), c);
}

static void on_tick(u64 now) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));) {
        if (c->state == SPLICED || now - c->opened_ms < hold_timeout_ms) continue;
        fab_log(FAB_INFO, "{{name}}: held connection timed out");
        fab_count("timeouts", 1);
        fab_close(fab_table_key(&conns, c));
        fab_table_del(&conns, c);
    }
    if (fab_backend_ready()) connect_held();
}

/* An open connection to an unknown protocol may be busy: active while any is open. */
static void batch_end(void) {
    fab_need(fab_table_count(&conns) ? FAB_NEED_ACTIVE : FAB_NEED_NONE);
}

static const struct fab_handlers H = {
    .init = init,
    .stream_open = on_open,
    .upstream_result = on_result,
    .stream_close = on_close,
    .upstream_close = on_upstream_close,
    .backend_available = connect_held,
    .tick = on_tick,
    .batch_end = batch_end,
};
FAB_STREAM_ACTIVATOR(H)
