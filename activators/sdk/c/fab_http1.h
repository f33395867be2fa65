/* fab_http1.h - HTTP/1.1 message framing for activators (RFC 9112), on top of fabricd.h.
 *
 * Why: an activator that sits in front of an HTTP/1.1 service must know where one request
 * ends and the next begins (to answer some locally, to keep pipelined responses in order,
 * to know when a connection is idle), and must refuse what two parsers could read two ways
 * (request smuggling). This header does the framing, sans-IO and without copying: it never
 * buffers a body and never allocates.
 *
 * How:
 *   1. Heads: keep the bytes of an incomplete head in a bounded buffer of your own (16 KiB
 *      is the usual limit, FAB_H1_MAX_HEAD) and call fab_h1_head_len() on them: it returns
 *      the head's length once its empty line is there, 0 while more is needed. Then
 *      fab_h1_request() / fab_h1_response() parse it into a struct fab_h1_msg (method,
 *      target, version, status, the framing headers); it returns 0 or the status to
 *      answer (400, 431, 501, 505). Any header is found with fab_h1_header().
 *   2. Bodies: fab_h1_body_start() from the parsed head, then feed bytes to
 *      fab_h1_body(): it returns how many of them belong to this message (body bytes,
 *      chunk framing and trailers included: relay them as they are, or drop them) and
 *      sets b->done at the end of the message; the rest of the input is the next
 *      message. Chunk-size lines and trailers are parsed byte by byte, so nothing needs
 *      buffering and a chunked body of any length costs no memory.
 *
 *     struct fab_h1_msg m; struct fab_h1_body b;
 *     u32 n = fab_h1_head_len(buf, len, &scan);        (0: keep reading, up to the limit)
 *     int err = fab_h1_request(buf, n, &m);            (err: answer it and close)
 *     fab_h1_body_start(&b, &m, 0);
 *     u32 used = fab_h1_body(&b, data, len);           (b.err: 400 and close; b.done: next)
 *
 * Strictness (requests): CRLF line ends only; no whitespace before a header's colon; no
 * obsolete line folding (in trailers too); field names are tokens, values have no control bytes but HTAB;
 * Content-Length is digits only, at most once; Transfer-Encoding is exactly `chunked`
 * (other codings: 501), never together with Content-Length; HTTP/1.1 needs exactly one
 * Host. A violation is a 400, and the connection must be closed (the rest of its bytes
 * cannot be framed). Responses are read with the framing rules of RFC 9112 §6.3:
 * 1xx/204/304 and answers to HEAD have no body, chunked wins over Content-Length, else
 * Content-Length, else the body runs to the connection's end.
 */
#ifndef FAB_HTTP1_H
#define FAB_HTTP1_H

#include "fabricd.h"

#define FAB_H1_MAX_HEAD (16 * 1024)
#define FAB_H1_MAX_CHUNK_LINE 1024 /* a chunk-size line with its extensions */
#define FAB_H1_MAX_TRAILERS (16 * 1024)

/* what the head says about framing and the connection */
#define FAB_H1_CLOSE 1u          /* Connection: close (or HTTP/1.0 without keep-alive) */
#define FAB_H1_KEEPALIVE 2u      /* Connection: keep-alive */
#define FAB_H1_CHUNKED 4u        /* Transfer-Encoding: chunked */
#define FAB_H1_HAS_LENGTH 8u     /* Content-Length present */
#define FAB_H1_EXPECT_100 16u    /* Expect: 100-continue */
#define FAB_H1_UPGRADE 32u       /* Upgrade header present */

struct fab_h1_msg {
    const u8 *method; /* requests: the request line's parts (pointers into the head) */
    u32 method_len;
    const u8 *target;
    u32 target_len;
    u32 minor;        /* HTTP/1.<minor>: 0 or 1 */
    u32 status;       /* responses */
    u32 flags;        /* FAB_H1_* above */
    u64 length;       /* Content-Length, when FAB_H1_HAS_LENGTH */
    const u8 *head;   /* the whole head, for fab_h1_header() */
    u32 head_len;
};

FAB_INLINE int fab_h1_tchar(u8 c) {
    if (c >= '0' && c <= '9') return 1;
    if ((c | 32) >= 'a' && (c | 32) <= 'z') return 1;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
        return 1;
    default:
        return 0;
    }
}

/* The length of the head in p[0..n) (through its empty line), or 0 while incomplete.
 * *scan keeps how far it looked (start it at 0 for each head), so feeding a head in many
 * small pieces stays linear. Leading empty lines (RFC 9112 §2.2) count as part of it. */
static FAB_UNUSED u32 fab_h1_head_len(const u8 *p, u32 n, u32 *scan) {
    u32 i = *scan;
    /* skip empty lines before the start line */
    u32 start = 0;
    while (start + 1 < n && p[start] == '\r' && p[start + 1] == '\n') start += 2;
    if (i < start) i = start;
    for (; i + 3 < n; i++) {
        if (p[i + 3] != '\n') continue;
        if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r') {
            *scan = i;
            return i + 4;
        }
    }
    *scan = i; /* the last 3 bytes are looked at again with the next piece */
    return 0;
}

/* One line of the head: [*at, end of line) without the CRLF; 0 at the empty line or on a
 * line not ended by CRLF (then *bad is set). */
static FAB_UNUSED int fab__h1_line(const u8 *p, u32 n, u32 *at, u32 *ls, u32 *le, int *bad) {
    u32 i = *at;
    u32 s = i;
    while (i < n && p[i] != '\r' && p[i] != '\n') i++;
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n') { *bad = 1; return 0; }
    *ls = s;
    *le = i;
    *at = i + 2;
    return i > s;
}

/* Value of the header `name` (case-insensitive), its first occurrence from *it on (start
 * at 0; call again for the next one); 0 when there is none. */
static FAB_UNUSED int fab_h1_header(const struct fab_h1_msg *m, const char *name, u32 *it,
                                    const u8 **val, u32 *vlen) {
    const u8 *p = m->head;
    u32 n = m->head_len, nl = fab_strlen(name), at = *it, ls, le;
    int bad = 0;
    if (at == 0) { /* skip leading empty lines and the start line */
        while (at + 1 < n && p[at] == '\r' && p[at + 1] == '\n') at += 2;
        if (!fab__h1_line(p, n, &at, &ls, &le, &bad)) return 0;
    }
    while (fab__h1_line(p, n, &at, &ls, &le, &bad)) {
        u32 c = ls;
        while (c < le && p[c] != ':') c++;
        if (c >= le || c - ls != nl || !fab_memeq_ci(p + ls, name, nl)) continue;
        u32 vs = c + 1, ve = le;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        *val = p + vs;
        *vlen = ve - vs;
        *it = at;
        return 1;
    }
    return 0;
}

/* Whether the comma-separated list v contains `tok` (case-insensitive). */
static FAB_UNUSED int fab_h1_has_token(const u8 *v, u32 n, const char *tok) {
    u32 tl = fab_strlen(tok), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        u32 s = i;
        while (i < n && v[i] != ',') i++;
        u32 e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e - s == tl && fab_memeq_ci(v + s, tok, tl)) return 1;
    }
    return 0;
}

/* Header lines after the start line: checks their syntax and fills m->flags/length. */
static FAB_UNUSED int fab__h1_fields(struct fab_h1_msg *m, u32 at, int request) {
    const u8 *p = m->head;
    u32 n = m->head_len, ls, le, hosts = 0, te = 0;
    int bad = 0;
    while (fab__h1_line(p, n, &at, &ls, &le, &bad)) {
        if (p[ls] == ' ' || p[ls] == '\t') return 400; /* obs-fold */
        u32 c = ls;
        while (c < le && fab_h1_tchar(p[c])) c++;
        if (c == ls || c >= le || p[c] != ':') return 400; /* no name, or space before ':' */
        u32 nl = c - ls, vs = c + 1, ve = le;
        for (u32 k = vs; k < ve; k++)
            if ((p[k] < 32 && p[k] != '\t') || p[k] == 127) return 400;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        const u8 *v = p + vs, *nm = p + ls;
        u32 vl = ve - vs;
        if (nl == 14 && fab_memeq_ci(nm, "content-length", 14)) {
            if ((m->flags & FAB_H1_HAS_LENGTH) || vl == 0 || vl > 18) return 400;
            u64 len = 0;
            for (u32 k = 0; k < vl; k++) {
                if (v[k] < '0' || v[k] > '9') return 400;
                len = len * 10 + (u64)(v[k] - '0');
            }
            m->length = len;
            m->flags |= FAB_H1_HAS_LENGTH;
        } else if (nl == 17 && fab_memeq_ci(nm, "transfer-encoding", 17)) {
            te++;
            if (vl == 7 && fab_memeq_ci(v, "chunked", 7)) m->flags |= FAB_H1_CHUNKED;
            else if (request) return 501; /* a coding we cannot frame (or chunked twice) */
            else { /* a response coded otherwise: its body runs to the connection's end */
                m->flags &= ~(FAB_H1_CHUNKED | FAB_H1_HAS_LENGTH);
                m->flags |= FAB_H1_CLOSE;
                te = 1000;
            }
        } else if (nl == 10 && fab_memeq_ci(nm, "connection", 10)) {
            if (fab_h1_has_token(v, vl, "close")) m->flags |= FAB_H1_CLOSE;
            if (fab_h1_has_token(v, vl, "keep-alive")) m->flags |= FAB_H1_KEEPALIVE;
        } else if (nl == 4 && fab_memeq_ci(nm, "host", 4)) {
            hosts++;
        } else if (nl == 6 && fab_memeq_ci(nm, "expect", 6)) {
            if (vl == 12 && fab_memeq_ci(v, "100-continue", 12)) m->flags |= FAB_H1_EXPECT_100;
        } else if (nl == 7 && fab_memeq_ci(nm, "upgrade", 7)) {
            m->flags |= FAB_H1_UPGRADE;
        }
    }
    if (bad) return 400;
    if (request) {
        if (te > 1) return 501;
        if (te && (m->flags & FAB_H1_HAS_LENGTH)) return 400; /* smuggling: both framings */
        if (m->minor == 1 && hosts != 1) return 400;
        if (m->minor == 0 && hosts > 1) return 400;
    } else if (te >= 1000) {
        m->flags &= ~(FAB_H1_CHUNKED | FAB_H1_HAS_LENGTH);
    } else if (m->flags & FAB_H1_CHUNKED) {
        m->flags &= ~FAB_H1_HAS_LENGTH; /* chunked wins (RFC 9112 §6.3) */
    }
    if (m->minor == 0 && !(m->flags & FAB_H1_KEEPALIVE)) m->flags |= FAB_H1_CLOSE;
    return 0;
}

/* "HTTP/1.x" at p[i..i+8): sets *minor; 0, 400 (not HTTP) or 505 (another version). */
static FAB_UNUSED int fab__h1_version(const u8 *p, u32 i, u32 end, u32 *minor) {
    if (end - i != 8 || !fab_memeq(p + i, "HTTP/", 5) || p[i + 6] != '.') return 400;
    if (p[i + 5] < '0' || p[i + 5] > '9' || p[i + 7] < '0' || p[i + 7] > '9') return 400;
    if (p[i + 5] != '1' || p[i + 7] > '1') return 505;
    *minor = (u32)(p[i + 7] - '0');
    return 0;
}

/* Parse a request head (its length from fab_h1_head_len). 0, or the status to answer
 * before closing: 400 malformed, 501 a transfer coding other than chunked, 505 not
 * HTTP/1.x. */
static FAB_UNUSED int fab_h1_request(const u8 *p, u32 n, struct fab_h1_msg *m) {
    fab_zero(m, sizeof *m);
    m->head = p;
    m->head_len = n;
    u32 at = 0, ls, le;
    int bad = 0;
    while (at + 1 < n && p[at] == '\r' && p[at + 1] == '\n') at += 2;
    if (!fab__h1_line(p, n, &at, &ls, &le, &bad)) return 400;
    u32 i = ls;
    while (i < le && fab_h1_tchar(p[i])) i++;
    if (i == ls || i >= le || p[i] != ' ') return 400;
    m->method = p + ls;
    m->method_len = i - ls;
    u32 ts = ++i;
    while (i < le && p[i] > 32 && p[i] < 127) i++;
    if (i == ts || i >= le || p[i] != ' ') return 400;
    m->target = p + ts;
    m->target_len = i - ts;
    int v = fab__h1_version(p, i + 1, le, &m->minor);
    if (v) return v;
    return fab__h1_fields(m, at, 1);
}

/* Parse a response head. 0, or 502 when it is not an HTTP/1.x status line (or malformed
 * framing): the caller cannot relay what follows. */
static FAB_UNUSED int fab_h1_response(const u8 *p, u32 n, struct fab_h1_msg *m) {
    fab_zero(m, sizeof *m);
    m->head = p;
    m->head_len = n;
    u32 at = 0, ls, le;
    int bad = 0;
    if (!fab__h1_line(p, n, &at, &ls, &le, &bad)) return 502;
    if (le - ls < 12 || fab__h1_version(p, ls, ls + 8, &m->minor) || p[ls + 8] != ' ')
        return 502;
    for (u32 k = 9; k < 12; k++)
        if (p[ls + k] < '0' || p[ls + k] > '9') return 502;
    m->status = (u32)(p[ls + 9] - '0') * 100 + (u32)(p[ls + 10] - '0') * 10 + (p[ls + 11] - '0');
    if (m->status < 100) return 502;
    return fab__h1_fields(m, at, 0) ? 502 : 0;
}

/* ---------------------------------------------------------------- bodies */

enum {
    FAB_H1B_DONE = 0, /* the message ended */
    FAB_H1B_LENGTH,   /* `left` bytes to go */
    FAB_H1B_EOF,      /* to the connection's end */
    FAB_H1B_SIZE,     /* chunked: the size line's hex digits */
    FAB_H1B_EXT,      /* chunked: extensions up to the CR */
    FAB_H1B_SIZE_LF,
    FAB_H1B_DATA,     /* chunked: `left` bytes of chunk data */
    FAB_H1B_DATA_CR,
    FAB_H1B_DATA_LF,
    FAB_H1B_TRAILER,  /* trailer lines; `left` counts the bytes of the current one */
    FAB_H1B_TRAILER_LF,
};

struct fab_h1_body {
    u8 state;
    u8 done;   /* the message is complete */
    u8 err;    /* malformed chunked framing: answer 400 (or drop the peer) and close */
    u8 digits; /* of the chunk size */
    u64 left;
    u32 line;  /* bytes of the current size line / trailer section */
};

/* Framing from a parsed head. is_head_response: a response to HEAD (no body). */
static FAB_UNUSED void fab_h1_body_start(struct fab_h1_body *b, const struct fab_h1_msg *m,
                                         int is_head_response) {
    fab_zero(b, sizeof *b);
    int response = m->status != 0;
    if (response && (is_head_response || m->status < 200 || m->status == 204 || m->status == 304)) {
        b->done = 1;
    } else if (m->flags & FAB_H1_CHUNKED) {
        b->state = FAB_H1B_SIZE;
    } else if (m->flags & FAB_H1_HAS_LENGTH) {
        b->state = FAB_H1B_LENGTH;
        b->left = m->length;
        b->done = m->length == 0;
    } else if (response) {
        b->state = FAB_H1B_EOF; /* runs to the connection's end */
    } else {
        b->done = 1; /* a request without framing has no body */
    }
}

FAB_INLINE int fab__h1_hex(u8 c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = fab_lower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* How many of p[0..n) belong to the current message's body (stops at its end; sets
 * b->done there, or b->err on malformed chunk framing: then the bytes before the one
 * that broke it are counted, so a relay can forward exactly those). */
static FAB_UNUSED u32 fab_h1_body(struct fab_h1_body *b, const u8 *p, u32 n) {
    u32 i = 0, at = 0;
    while (i < n && !b->done && !b->err) {
        at = i;
        switch (b->state) {
        case FAB_H1B_LENGTH:
        case FAB_H1B_DATA: {
            u32 k = b->left < (u64)(n - i) ? (u32)b->left : n - i;
            i += k;
            b->left -= k;
            if (!b->left) {
                if (b->state == FAB_H1B_LENGTH) b->done = 1;
                else b->state = FAB_H1B_DATA_CR;
            }
            break;
        }
        case FAB_H1B_EOF:
            i = n;
            break;
        case FAB_H1B_SIZE: {
            u8 c = p[i];
            int h = fab__h1_hex(c);
            if (h >= 0) {
                if (++b->digits > 15) { b->err = 1; break; }
                b->left = b->left * 16 + (u64)h;
                i++;
            } else if (b->digits && (c == ';' || c == ' ' || c == '\t')) {
                b->state = FAB_H1B_EXT;
            } else if (b->digits && c == '\r') {
                b->state = FAB_H1B_SIZE_LF;
                i++;
            } else {
                b->err = 1;
            }
            b->line++;
            break;
        }
        case FAB_H1B_EXT: {
            u8 c = p[i++];
            if (++b->line > FAB_H1_MAX_CHUNK_LINE) b->err = 1;
            else if (c == '\r') b->state = FAB_H1B_SIZE_LF;
            else if ((c < 32 && c != '\t') || c == 127) b->err = 1;
            break;
        }
        case FAB_H1B_SIZE_LF:
            if (p[i++] != '\n') { b->err = 1; break; }
            b->digits = 0;
            b->line = 0;
            if (b->left) b->state = FAB_H1B_DATA;
            else b->state = FAB_H1B_TRAILER;
            break;
        case FAB_H1B_DATA_CR:
            if (p[i++] != '\r') b->err = 1;
            else b->state = FAB_H1B_DATA_LF;
            break;
        case FAB_H1B_DATA_LF:
            if (p[i++] != '\n') b->err = 1;
            else b->state = FAB_H1B_SIZE;
            break;
        case FAB_H1B_TRAILER: {
            /* a field line, checked as a header's: b->left counts this line's bytes,
             * b->digits is 0 in the name, 1 in the value; b->line counts all of them */
            u8 c = p[i++];
            if (++b->line > FAB_H1_MAX_TRAILERS) { b->err = 1; break; }
            if (c == '\r') {
                if (b->left && !b->digits) b->err = 1; /* a name without a colon */
                else b->state = FAB_H1B_TRAILER_LF;
                break;
            }
            if (!b->digits) {
                if (c == ':' && b->left) b->digits = 1;
                else if (!fab_h1_tchar(c)) b->err = 1; /* folding, space before ':' */
            } else if ((c < 32 && c != '\t') || c == 127) {
                b->err = 1;
            }
            b->left++;
            break;
        }
        case FAB_H1B_TRAILER_LF:
            if (p[i++] != '\n') { b->err = 1; break; }
            if (!b->left) b->done = 1; /* the empty line ends the trailers */
            b->left = 0;
            b->digits = 0;
            b->state = FAB_H1B_TRAILER;
            break;
        default:
            b->done = 1;
            break;
        }
    }
    if (b->err) i = at; /* the byte that broke the framing is not the message's */
    if (b->done) b->state = FAB_H1B_DONE;
    return i;
}

/* Whether the body runs to the connection's end (a response without framing). */
FAB_INLINE int fab_h1_body_to_eof(const struct fab_h1_body *b) { return b->state == FAB_H1B_EOF; }

/* ---------------------------------------------------------------- answers */

FAB_INLINE u32 fab_h1_put(u8 *o, u32 at, const void *s, u32 n) {
    fab_copy(o + at, s, n);
    return at + n;
}
FAB_INLINE u32 fab_h1_puts(u8 *o, u32 at, const char *s) { return fab_h1_put(o, at, s, fab_strlen(s)); }
static FAB_UNUSED u32 fab_h1_putu(u8 *o, u32 at, u32 v) {
    char t[10];
    u32 k = 0;
    do { t[k++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (k) o[at++] = (u8)t[--k];
    return at;
}

FAB_INLINE const char *fab_h1_reason(u32 status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    }
}

/* Write a whole response into o (at least 160 + extra_len + body_len bytes): status line,
 * Content-Length, `extra` (header lines, each ending in CRLF, may be empty), the body
 * unless `head_only`. Returns its length. */
static FAB_UNUSED u32 fab_h1_answer(u8 *o, u32 status, const u8 *extra, u32 extra_len,
                                    const u8 *body, u32 body_len, int head_only) {
    u32 at = fab_h1_puts(o, 0, "HTTP/1.1 ");
    at = fab_h1_putu(o, at, status % 1000);
    o[at++] = ' ';
    at = fab_h1_puts(o, at, fab_h1_reason(status));
    at = fab_h1_puts(o, at, "\r\nContent-Length: ");
    at = fab_h1_putu(o, at, body_len);
    at = fab_h1_puts(o, at, "\r\n");
    at = fab_h1_put(o, at, extra, extra_len);
    at = fab_h1_puts(o, at, "\r\n");
    if (!head_only) at = fab_h1_put(o, at, body, body_len);
    return at;
}

#endif
