"""Services that scale to zero, end to end with the daemon: a dormant service whose
on_activate hook starts a real HTTP server after a delay, many clients started before
the backend exists, the idle hook stopping it, and a backend that never comes up."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

from fabric.tools.sandbox import Daemon, Sandbox

VIP = "10.40.0.100"


def setup(sb: Sandbox, service: dict) -> tuple[Daemon, str, str]:
    worker = sb.netns("worker")
    client, web = sb.netns("client"), sb.netns("web")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": web}],
          "services": [service]}
    d = Daemon(sb, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return d, client, web


def start_cmd(web: str, delay: float) -> str:
    return (f"sh -c '(sleep {delay}; exec ip netns exec {web} {sys.executable} -m "
            f"fabric.tools.sandbox http 8080) >/dev/null 2>&1 &'")


def curl(sb: Sandbox, ns: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return sb.run(ns, "curl", "-sS", "--max-time", str(timeout), f"http://{VIP}/",
                  check=False, timeout=timeout + 10)


def test_dormant_service_woken_by_a_real_request(sandbox: Sandbox) -> None:
    web_ns = sandbox.name("web")
    d, client, web = setup(sandbox, {
        "name": "web", "ip": VIP, "ports": [{"port": 80, "target_port": 8080}],
        "backends": ["web-1"], "idle_timeout": "3s",
        # The backend appears 3 s after the wake: every client below starts before it.
        "on_activate": start_cmd(web_ns, 3.0),
        "on_idle": f"sh -c 'ip netns pids {web_ns} | xargs -r kill'"})
    first = d.get("/v1/services")[0]
    assert first["state"] == "dormant", (first, d.log()[-2000:])
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda _: curl(sandbox, client), range(200)))
    took = time.monotonic() - t0
    failed = [r for r in results if r.returncode != 0 or "hello from" not in r.stdout]
    assert not failed, (len(failed), failed[0].stderr if failed else "", d.log()[-2000:])
    assert took < 30
    svc = d.get("/v1/services")[0]
    assert svc["counters"]["held"] >= 200 and svc["counters"]["released"] >= 200
    # Idle: the hook stops the server after idle_timeout; the next request wakes it again.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if d.get("/v1/services")[0]["state"] in ("idle", "dormant") and \
                not sandbox.run(None, "ip", "netns", "pids", web).stdout.strip():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not idle: {d.get('/v1/services')[0]}")
    r = curl(sandbox, client)
    assert r.returncode == 0 and "hello from" in r.stdout, r.stderr


def test_backend_that_never_comes_up_is_refused(sandbox: Sandbox) -> None:
    d, client, web = setup(sandbox, {
        "name": "web", "ip": VIP, "ports": [{"port": 80, "target_port": 8080}],
        "backends": ["web-1"], "hold": {"timeout": "2s"}})
    t0 = time.monotonic()
    r = curl(sandbox, client, timeout=20)
    took = time.monotonic() - t0
    assert r.returncode == 7, (r.returncode, r.stderr)  # connection refused, not a hang
    assert 1.5 < took < 6, took
    assert d.get("/v1/services")[0]["counters"]["hold_timeout"] >= 1


def test_activators_tcp_and_hostile_side_by_side(sandbox: Sandbox) -> None:
    """Two services: one with the TCP activator, one with an activator that loops
    forever. Both wake and serve (the hostile one falls back to hold-and-activate and is
    counted); a stray ACK to the dormant TCP-activator service is dropped, not a wake."""
    import os

    web_ns = sandbox.name("web")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = sandbox.netns("worker")
    client, web = sandbox.netns("client"), sandbox.netns("web")
    loop_wasm = os.path.join(root, "activators", "testing", "loop.wasm")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": web}],
          "services": [
              {"name": "good", "ip": VIP, "backends": ["web-1"],
               "ports": [{"port": 80, "target_port": 8080, "activator": "tcp"}],
               "on_activate": start_cmd(web_ns, 0.3)},
              {"name": "bad", "ip": "10.40.0.101", "backends": ["web-1"],
               "ports": [{"port": 80, "target_port": 8080, "activator": loop_wasm}],
               "on_activate": start_cmd(web_ns, 0.3)}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    # A stray ACK (no connection) to the dormant service: dropped by the activator.
    sandbox.run(client, sys.executable, "-c",
                "from scapy.all import IP, TCP, send; "
                f"send(IP(dst='{VIP}')/TCP(dport=80, flags='A'), verbose=0)")
    time.sleep(0.3)
    good = next(s for s in d.get("/v1/services") if s["name"] == "good")
    assert good["state"] == "dormant" and good["counters"]["activations"] == 0, good
    # The hostile activator's service first: its instance is killed by the deadline,
    # recreated, and the service holds and activates without it.
    r = sandbox.run(client, "curl", "-sS", "--max-time", "20", "http://10.40.0.101/",
                    check=False, timeout=30)
    assert r.returncode == 0 and "hello from" in r.stdout, r.stderr
    # The other hostile modules, each on its own dormant service (its own target port,
    # woken by its hook): served through the fallback, each misbehaviour counted; the
    # action flood served with its answers cut and counted; the memory and table bombs
    # refused at load, their services holding and activating without an activator.
    refused = ("multimem", "tablebomb")
    mods = ("membomb", "trap", "garbage", "noexport", "flood", *refused)
    for i, mod in enumerate(mods):
        port = 8081 + i
        ns["services"].append({
            "name": f"hostile-{mod}", "ip": f"10.40.0.{110 + i}", "backends": ["web-1"],
            "ports": [{"port": 80, "target_port": port,
                       "activator": os.path.join(root, "activators", "testing",
                                                 f"{mod}.wasm")}],
            "on_activate": start_cmd(web_ns, 0.3).replace("http 8080", f"http {port}")})
    d.write_config({"namespaces": [ns]})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(d.get("/v1/services")) < 2 + len(mods) and time.monotonic() < deadline:
        time.sleep(0.1)
    for i, mod in enumerate(mods):
        r = sandbox.run(client, "curl", "-sS", "--max-time", "20",
                        f"http://10.40.0.{110 + i}/", check=False, timeout=30)
        assert r.returncode == 0 and "hello from" in r.stdout, (mod, r.stderr)
    hostile = {s["name"].removeprefix("hostile-"): s["activators"].get("80")
               for s in d.get("/v1/services") if s["name"].startswith("hostile-")}
    assert sorted(hostile) == sorted(mods)
    for mod, st in hostile.items():
        if mod in refused:
            assert st is None, (mod, st)
        elif mod == "flood":
            assert st["actions_over_limit"] >= 65535 - 64 and st["fallbacks"] == 0, st
        else:
            assert st["recreated"] + st["bad_module"] + st["fallbacks"] >= 1, (mod, st)
    r = curl(sandbox, client)
    assert r.returncode == 0 and "hello from" in r.stdout, r.stderr
    svcs = {s["name"]: s for s in d.get("/v1/services")}
    assert svcs["good"]["activators"]["80"]["calls"] >= 1
    bad = svcs["bad"]["activators"]["80"]
    assert bad["recreated"] >= 1 and bad["traps"] >= 1, bad


def test_two_backends_share_and_unready_takes_no_new_flows(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    client, w1, w2 = sandbox.netns("client"), sandbox.netns("w1"), sandbox.netns("w2")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": w1},
                   {"name": "web-2", "ip": "10.40.0.4", "netns": w2}],
          "services": [{"name": "web", "ip": VIP, "backends": ["web-1", "web-2"],
                        "ports": [{"port": 80, "target_port": 8080}]}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(3)
    sandbox.http_server(w1, 8080)
    sandbox.http_server(w2, 8080)

    def who() -> str:
        r = curl(sandbox, client, timeout=10)
        assert r.returncode == 0, r.stderr
        return r.stdout.split("pid ")[1].strip()

    seen = {who() for _ in range(30)}
    assert len(seen) == 2, seen  # flows spread over both backends
    d.cli("ready", "shop/web-2", "--unready")
    after = {who() for _ in range(20)}
    assert len(after) == 1 and after < seen, (after, seen)
    backends = {b["name"]: b for b in d.get("/v1/services")[0]["backends"]}
    assert backends["web-2"]["ready"] is False and backends["web-1"]["ready"] is True


SAME_PORT_CLIENT = r"""
import socket, sys
def conn(vip):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.40.0.2", 40000))
    s.settimeout(5)
    s.connect((vip, 80))
    return s
a = conn(sys.argv[1])  # kept open while the second connects from the same port
b = conn(sys.argv[2])
for s in (b, a):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"hello from" not in data:
        more = s.recv(4096)
        assert more, data
        data += more
print("ok", a.getpeername()[0], b.getpeername()[0])
"""


def test_two_services_with_one_backend_and_one_client_port(sandbox: Sandbox) -> None:
    """Two VIPs in front of the same pod:port; one client connects to both from port
    40000, the first connection kept open: both are answered from their own VIP (the
    second flow's source port is remapped toward the backend)."""
    worker = sandbox.netns("worker")
    client, web = sandbox.netns("client"), sandbox.netns("web")
    other = "10.40.0.101"
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": web}],
          "services": [{"name": n, "ip": ip, "backends": ["web-1"],
                        "ports": [{"port": 80, "target_port": 8080}]}
                       for n, ip in (("a", VIP), ("b", other))]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    sandbox.http_server(web, 8080)
    deadline = time.monotonic() + 10
    while not all(s["backends"][0]["ready"] for s in d.get("/v1/services")):
        assert time.monotonic() < deadline, d.get("/v1/services")
        time.sleep(0.1)
    r = sandbox.run(client, sys.executable, "-c", SAME_PORT_CLIENT, VIP, other,
                    check=False, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["ok", VIP, other], (
        r.stdout, r.stderr[-2000:], d.log()[-2000:])
    flows = {s["name"]: s["counters"]["dnat_flows"] for s in d.get("/v1/services")}
    assert flows == {"a": 1, "b": 1}, flows


def _services(d: Daemon) -> dict[str, dict]:
    return {s["name"]: s for s in d.get("/v1/services")}


def test_dormant_services_share_the_worker_hold_budget(sandbox: Sandbox) -> None:
    """Two dormant services, each allowed 8 MiB of held packets, under a worker budget
    of 1 MiB: a pod's datagrams to both fill the budget, not 2 x 8 MiB; the rest are
    dropped (`service_hold_budget`) with one warning; a reload raises the budget."""
    worker, client = sandbox.netns("worker"), sandbox.netns("client")

    def svc(name: str, ip: str) -> dict:
        return {"name": name, "ip": ip, "hold": {"packets": 4096, "timeout": "60s"},
                "ports": [{"port": 53, "target_port": 5353, "protocol": "udp"}]}

    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client}],
          "services": [svc("a", "10.40.0.100"), svc("b", "10.40.0.101")]}
    config = {"worker": {"id": "fabricd", "service_hold_bytes": "1MiB"}, "namespaces": [ns]}
    d = Daemon(sandbox, worker, config).start()
    d.wait_attached(1)
    # 1,000-byte IPv4 packets, paced a little so nothing is lost on the way in.
    send = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "n = int(sys.argv[1])\n"
            "for ip in sys.argv[2:]:\n"
            "    for i in range(n):\n"
            "        s.sendto(b'x' * 972, (ip, 53))\n"
            "        time.sleep(0.0005)\n")
    sandbox.run(client, sys.executable, "-c", send, "800", "10.40.0.100", "10.40.0.101")
    limit = 1 << 20
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        svcs = _services(d)
        held = svcs["a"]["held_bytes"] + svcs["b"]["held_bytes"]
        if held + 1000 > limit:
            break
        time.sleep(0.1)
    assert limit - 1000 < held <= limit, (svcs, d.log()[-2000:])
    refused = svcs["b"]["counters"]["hold_budget"]
    assert refused >= 500 and svcs["a"]["counters"]["hold_budget"] == 0, svcs
    assert svcs["a"]["counters"]["hold_overflow"] == svcs["b"]["counters"]["hold_overflow"] == 0
    from fabric.control.client import ControlClient

    text = ControlClient(d.control).get_text("/metrics")
    drops = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("fabric_drops_total{") and 'reason="service_hold_budget"' in line]
    assert sum(drops) == refused, (drops, refused)
    warned = [line for line in d.log().splitlines() if "service b: the worker's services hold"
              in line]
    assert len(warned) == 1, d.log()[-3000:]
    # A reload raises the budget: b holds again.
    config["worker"]["service_hold_bytes"] = "2MiB"
    d.write_config(config)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "hold budget is now 2097152 bytes" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hold budget is now 2097152 bytes" in d.log(), d.log()[-3000:]
    assert "need a restart" not in d.log()
    before = svcs["b"]["held_packets"]
    sandbox.run(client, sys.executable, "-c", send, "100", "10.40.0.101")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _services(d)["b"]["held_packets"] < before + 100:
        time.sleep(0.1)
    b = _services(d)["b"]
    assert b["held_packets"] == before + 100 and b["counters"]["hold_budget"] == refused, b
