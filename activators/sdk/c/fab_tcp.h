/* fab_tcp.h - a read-only view of an IPv4 TCP segment, for packet (L3) activators.
 *
 * Why: a packet activator judges SYNs, RSTs and stray segments; every one of them parsed
 * the same header fields by hand. fab_tcp_parse checks what can be judged (IPv4, a sane
 * IHL, TCP, not a later fragment, a TCP header that fits) and fills the view; anything
 * else returns -1 and is best dropped without waking a backend.
 */
#ifndef FAB_TCP_H
#define FAB_TCP_H
#include "fabricd.h"

#define FAB_TCP_FIN 0x01
#define FAB_TCP_SYN 0x02
#define FAB_TCP_RST 0x04
#define FAB_TCP_PSH 0x08
#define FAB_TCP_ACK 0x10

struct fab_tcp {
    u32 src, dst;     /* addresses as read little-endian: for comparing and hashing only */
    u32 sport, dport; /* host order */
    u32 seq, ack;     /* host order */
    u32 flags;        /* FAB_TCP_* */
    u32 window;
    const u8 *payload;
    u32 payload_len;
};

/* 0 and the view filled, or -1 for anything but an unfragmented (or first-fragment) IPv4
 * TCP segment with complete headers. */
static FAB_UNUSED int fab_tcp_parse(const u8 *ip, u32 n, struct fab_tcp *t) {
    if (n < 20 || (ip[0] >> 4) != 4) return -1;
    u32 ihl = (u32)(ip[0] & 0x0f) * 4;
    if (ihl < 20 || n < ihl + 20 || ip[9] != 6 || (fab_be16(ip + 6) & 0x1fff) != 0) return -1;
    const u8 *tcp = ip + ihl;
    u32 doff = (u32)(tcp[12] >> 4) * 4;
    u32 total = fab_be16(ip + 2);
    if (total > n || total < ihl) total = n; /* trust what arrived, not the length field */
    if (doff < 20 || ihl + doff > total) doff = 20;
    t->src = fab_le32(ip + 12);
    t->dst = fab_le32(ip + 16);
    t->sport = fab_be16(tcp);
    t->dport = fab_be16(tcp + 2);
    t->seq = fab_be32(tcp + 4);
    t->ack = fab_be32(tcp + 8);
    t->flags = tcp[13];
    t->window = fab_be16(tcp + 14);
    t->payload = tcp + doff;
    t->payload_len = total - ihl - doff;
    return 0;
}

/* A SYN that opens a connection (not a SYN-ACK). */
FAB_INLINE int fab_tcp_is_syn(const struct fab_tcp *t) {
    return (t->flags & (FAB_TCP_SYN | FAB_TCP_ACK)) == FAB_TCP_SYN;
}

/* The flow key compared in tables: src, dst and both ports. */
FAB_INLINE u32 fab_tcp_ports(const struct fab_tcp *t) { return (t->sport << 16) | t->dport; }

#endif
