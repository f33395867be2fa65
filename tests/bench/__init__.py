"""Benchmarks: the fabric against the kernel on the same machine, in the same run.

`python -m tests.bench [NAME ...] [--runs N] [--seconds S] [--out FILE] [--quick]` runs
`tcp`, `udp`, `ping` (real daemon in throwaway `fbb-*` namespaces against a plain veth
pair), `scale` (in-process routers), `dns` (the gateway's DNS against dnsmasq, with
dnsperf) and `egress` (iperf3 through the egress NAT against kernel forwarding). Each
prints a table of raw runs, medians, ratios and PASS/MISSED against its target; all
results go to `bench-results.json`. These are reports, not tests: a missed target does
not fail the exit code.
"""
