"""The daemon end to end: `fabricd run` inside a worker namespace, pods in their own
namespaces, real ping, curl, iperf3, and the CLI against the control socket."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from fabric.net import pcap
from fabric.tools.sandbox import Daemon, Sandbox

CIDR = "10.40.0.0/24"


def two_pods(sb: Sandbox, name: str = "shop", cidr: str = CIDR,
             extra: list[dict[str, Any]] | None = None) -> tuple[str, str, dict[str, Any]]:
    a = sb.netns(f"{name}-a")
    b = sb.netns(f"{name}-b")
    base = cidr.rsplit(".", 1)[0]
    ns = {"name": name, "id": 7, "cidr": cidr,
          "pods": [{"name": "a", "ip": f"{base}.2", "netns": a},
                   {"name": "b", "ip": f"{base}.3", "netns": b}] + (extra or [])}
    return a, b, ns


def metric(d: Daemon, name: str, **labels: str) -> float:
    from fabric.control.client import ControlClient

    text = ControlClient(d.control).get_text("/metrics")
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def iperf_json(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(p.stdout)


def test_ping_http_iperf_between_pods(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)

    out = sandbox.run(a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.40.0.3").stdout
    assert "3 received" in out
    assert "ttl=63" in out  # one routed hop
    assert "2 received" in sandbox.run(b, "ping", "-c", "2", "-i", "0.2", "10.40.0.1").stdout

    sandbox.http_server(b, 8080)
    body = sandbox.run(a, "curl", "-sS", "--max-time", "5", "http://10.40.0.3:8080/").stdout
    assert body.startswith("hello from")
    big = sandbox.run(a, "curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w",
                      "%{size_download}", "http://10.40.0.3:8080/bytes/20000000").stdout
    assert big == "20000000"

    sandbox.popen(b, "iperf3", "-s", "-1")
    sandbox.wait_port(b, 5201)
    tcp = iperf_json(sandbox.run(a, "iperf3", "-c", "10.40.0.3", "-t", "3", "-J",
                                 timeout=30))
    assert tcp["end"]["sum_received"]["bits_per_second"] > 500e6

    sandbox.popen(b, "iperf3", "-s", "-1")
    sandbox.wait_port(b, 5201)
    udp = iperf_json(sandbox.run(a, "iperf3", "-c", "10.40.0.3", "-u", "-b", "50M", "-t", "3",
                                 "-J", timeout=30))
    s = udp["end"]["sum"]
    assert s["packets"] > 10000
    assert s["lost_percent"] < 1.0, s

    pods = {p["name"]: p for p in d.get("/v1/pods")}
    assert pods["a"]["rx_packets"] > 10000 and pods["b"]["tx_packets"] > 10000


def test_interface_port_vmm_style(sandbox: Sandbox) -> None:
    """A pod behind an existing interface (as a VMM's TAP), emulated with a veth whose
    other end is the pod's eth0; its MAC is learned from its first frame."""
    worker = sandbox.netns("worker")
    a, vm, _ = sandbox.netns("a"), sandbox.netns("vm"), None
    sandbox.veth(worker, "tap-vm1", vm, "eth0")
    sandbox.run(vm, "ip", "addr", "add", "10.41.0.5/24", "dev", "eth0")
    sandbox.run(vm, "ip", "link", "set", "eth0", "up")
    sandbox.run(vm, "ip", "route", "add", "default", "via", "10.41.0.1")
    ns = {"name": "vms", "cidr": "10.41.0.0/24",
          "pods": [{"name": "a", "ip": "10.41.0.2", "netns": a},
                   {"name": "vm-1", "ip": "10.41.0.5", "interface": "tap-vm1"}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    # Traffic toward the VM first: the fabric must ARP for it (no MAC configured).
    assert "3 received" in sandbox.run(a, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                                       "10.41.0.5").stdout
    sandbox.http_server(vm, 8080)
    body = sandbox.run(a, "curl", "-sS", "--max-time", "5", "http://10.41.0.5:8080/").stdout
    assert body.startswith("hello from")
    sandbox.popen(a, "iperf3", "-s", "-1")
    sandbox.wait_port(a, 5201)
    tcp = iperf_json(sandbox.run(vm, "iperf3", "-c", "10.41.0.2", "-t", "2", "-J",
                                 timeout=30))
    assert tcp["end"]["sum_received"]["bits_per_second"] > 500e6
    pod = next(p for p in d.get("/v1/pods") if p["name"] == "vm-1")
    assert pod["kind"] == "interface" and pod["mac"]


def test_same_cidr_namespaces_are_isolated(sandbox: Sandbox) -> None:
    """Two namespaces with identical CIDRs, addresses and MACs, both busy at once: every
    frame a pod receives carries its own namespace's payload pattern."""
    worker = sandbox.netns("worker")
    a1, b1, ns1 = two_pods(sandbox, "red", "10.42.0.0/24")
    a2, b2, ns2 = two_pods(sandbox, "blue", "10.42.0.0/24")
    ns2["id"] = 8
    d = Daemon(sandbox, worker, {"namespaces": [ns1, ns2]}).start()
    d.wait_attached(4)
    caps = [sandbox.popen(b, "tcpdump", "-i", "eth0", "-nn", "-x", "-l", "icmp",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for b in (b1, b2)]
    for c in caps:  # wait until each capture really listens
        assert c.stderr is not None
        while "listening on" not in (line := c.stderr.readline()):
            assert line, "tcpdump exited before listening"
    pings = [sandbox.popen(a, "ping", "-c", "200", "-i", "0.005", "-p", pat, "-W", "2",
                           "10.42.0.3", text=True)
             for a, pat in ((a1, "aa"), (a2, "bb"))]
    for p in pings:
        out, _ = p.communicate(timeout=30)
        assert "200 received" in out, out
    time.sleep(0.5)
    dumps = []
    for c in caps:
        sandbox.stop(c, signal.SIGINT)
        dumps.append(c.stdout.read() if c.stdout else "")
    # Eight bytes of pattern: four hex digits alone also turn up in headers (an IP
    # checksum of 0xaaaa), which made this test fail now and then.
    a8, b8 = "aa" * 8, "bb" * 8
    for dump, mine, other in ((dumps[0], a8, b8), (dumps[1], b8, a8)):
        hexed = dump.replace(" ", "")
        assert hexed.count(mine) > 100, dump[:500]
        assert other not in hexed
    pods = {(p["namespace"], p["name"]): p for p in d.get("/v1/pods")}
    for n in ("red", "blue"):
        assert pods[(n, "b")]["tx_packets"] >= 200


def test_spoofed_source_is_dropped_and_counted(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    # Resolve the neighbour first with the honest address: ARP from a foreign sender
    # address is refused too, and then no IP packet would even be sent.
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2", "10.40.0.3").stdout
    sandbox.run(a, "ip", "addr", "add", "10.40.0.99/24", "dev", "eth0")
    before = metric(d, "fabric_drops_total", pod="a", reason="spoofed_source")
    out = sandbox.run(a, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "10.40.0.99",
                      "10.40.0.3", check=False).stdout
    assert " 0 received" in out
    after = metric(d, "fabric_drops_total", pod="a", reason="spoofed_source")
    assert after - before >= 3
    # The honest address still works.
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2", "10.40.0.3").stdout


def test_capture_is_a_valid_pcap(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    path = os.path.join(sandbox.tmp, "cap.pcap")
    cap = subprocess.Popen(d.cli_argv("capture", "shop/b", "-w", path, "-c", "10"),
                           stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    sandbox.run(a, "ping", "-c", "5", "-i", "0.1", "10.40.0.3")
    assert cap.wait(timeout=15) == 0, cap.stderr.read() if cap.stderr else ""
    with open(path, "rb") as f:
        frames = pcap.read_pcap(f.read())
    assert len(frames) == 10
    out = subprocess.run(["tshark", "-r", path, "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
                          "-e", "icmp.type"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [r.split("\t") for r in out.stdout.strip().splitlines()]
    assert ["10.40.0.2", "10.40.0.3", "8"] in rows  # echo request in
    assert ["10.40.0.3", "10.40.0.2", "0"] in rows  # echo reply out


def test_sighup_reload_keeps_flows(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    sandbox.popen(b, "iperf3", "-s", "-1")
    sandbox.wait_port(b, 5201)
    flow = sandbox.popen(a, "iperf3", "-c", "10.40.0.3", "-t", "6", "-i", "1", "-J", text=True)
    time.sleep(2)
    c = sandbox.netns("c")
    ns["pods"].append({"name": "c", "ip": "10.40.0.4", "netns": c})
    d.write_config({"namespaces": [ns]})
    d.signal(signal.SIGHUP)
    out, err = flow.communicate(timeout=30)
    assert flow.returncode == 0, err
    res = json.loads(out)
    rates = [iv["sum"]["bits_per_second"] for iv in res["intervals"]]
    assert len(rates) >= 6 and min(rates) > 100e6, rates
    assert "1 received" in sandbox.run(c, "ping", "-c", "1", "-W", "3", "10.40.0.2").stdout
    # Removing a pod on reload detaches it.
    ns["pods"] = [p for p in ns["pods"] if p["name"] != "c"]
    d.write_config({"namespaces": [ns]})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sandbox.run(c, "ip", "link", "show", "eth0", check=False).returncode:
            break
        time.sleep(0.1)
    else:
        pytest.fail("pod c's eth0 still present after reload removed it")


def _reloaded(d: Daemon, line: str) -> None:
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while line not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in d.log(), d.log()[-3000:]
    assert "need a restart" not in d.log(), d.log()[-3000:]


def test_busy_poll_forwards_and_changes_on_reload(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"worker": {"busy_poll": "3ms"}, "namespaces": [ns]}).start()
    d.wait_attached(2)
    out = sandbox.run(a, "ping", "-c", "20", "-i", "0.002", "-W", "2", "10.40.0.3").stdout
    assert "20 received" in out, out
    assert metric(d, "fabric_dataplane_busy_polls_total") > 0
    assert metric(d, "fabric_dataplane_busy_poll_spins_total", outcome="found") > 0
    assert metric(d, "fabric_dataplane_busy_poll_window_seconds") == 0.003
    # Adaptive: the pings' 2 ms gaps are within the max, so the spins find the next echo.
    d.write_config({"worker": {"id": "fabricd", "busy_poll": {"max": "3ms"}},
                    "namespaces": [ns]})
    _reloaded(d, "busy_poll is now adaptive up to 3 ms")
    out = sandbox.run(a, "ping", "-c", "20", "-i", "0.002", "-W", "2", "10.40.0.3").stdout
    assert "20 received" in out, out
    assert metric(d, "fabric_dataplane_busy_poll_spins_total", outcome="found") > 0
    # ping's replies come back inside the write of the request, so what the spins find
    # is the next request, 2 ms on: spins ahead, woken by the thread's own timer
    assert metric(d, "fabric_dataplane_busy_poll_ahead_total", event="woke") > 0
    assert 0 <= metric(d, "fabric_dataplane_busy_poll_window_seconds") <= 0.003
    d.write_config({"worker": {"id": "fabricd", "busy_poll": 0}, "namespaces": [ns]})
    _reloaded(d, "busy_poll is now 0 ms")
    polls = metric(d, "fabric_dataplane_busy_polls_total")
    out = sandbox.run(a, "ping", "-c", "5", "-i", "0.01", "-W", "2", "10.40.0.3").stdout
    assert "5 received" in out, out
    assert metric(d, "fabric_dataplane_busy_polls_total") == polls  # off: no more polls
    assert metric(d, "fabric_dataplane_busy_poll_window_seconds") == 0


def test_bad_config_names_file_key_problem(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    d = Daemon(sandbox, worker, {"namespaces": [
        {"name": "shop", "cidr": "10.40.0.0/24",
         "pods": [{"name": "a", "ip": "10.99.0.2", "netns": "x"}]}]})
    with pytest.raises(RuntimeError) as e:
        d.start(timeout=10)
    msg = str(e.value)
    assert d.config_path in msg and "namespaces[0].pods[0].ip" in msg and "10.99.0.2" in msg
    assert d.proc is not None and d.proc.returncode == 1


def test_sigterm_removes_everything(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2", "10.40.0.3").stdout
    assert d.stop() == 0
    for pod in (a, b):
        links = sandbox.run(pod, "ip", "-o", "link").stdout
        assert re.findall(r"^\d+: (\S+?)[:@]", links, re.M) == ["lo"], links
    links = sandbox.run(worker, "ip", "-o", "link").stdout
    assert re.findall(r"^\d+: (\S+?)[:@]", links, re.M) == ["lo"], links
    assert not os.path.exists(d.control)
    assert "shutting down" in d.log()


def test_cli_get_ready_events(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    table = d.cli("get", "pods", "-n", "shop")
    assert re.search(r"^shop\s+a\s+10\.40\.0\.2\s", table, re.M), table
    nss = json.loads(d.cli("get", "namespaces", "-o", "json"))
    assert nss[0]["name"] == "shop" and nss[0]["cidr"] == CIDR
    ev = subprocess.Popen(d.cli_argv("events", "-o", "json"), stdout=subprocess.PIPE,
                          text=True)
    time.sleep(0.5)
    d.cli("ready", "shop/a", "--unready")
    line = ev.stdout.readline() if ev.stdout else ""
    ev.terminate()
    ev.wait(5)
    e = json.loads(line)
    assert e["kind"] == "pod_unready" and e["namespace"] == "shop" and e["pod"] == "a"
    pods = {p["name"]: p for p in json.loads(d.cli("get", "pods", "-o", "json"))}
    assert pods["a"]["ready"] is False
    err = subprocess.run(d.cli_argv("ready", "shop/nope"), capture_output=True, text=True,
                         timeout=10)
    assert err.returncode != 0 and "nope" in err.stderr and err.stderr.count("\n") == 1


def test_pod_attached_late_gets_held_traffic(sandbox: Sandbox) -> None:
    """A pod whose namespace does not exist yet stays in the table; traffic to it is held,
    attaching is retried, and the held ping is delivered once the pod appears."""
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    late = sandbox.name("late")
    ns["pods"].append({"name": "late", "ip": "10.40.0.9", "netns": late})
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    pods = {p["name"]: p for p in d.get("/v1/pods")}
    assert not pods["late"]["attached"] and "late" in (pods["late"]["error"] or "")
    ping = sandbox.popen(a, "ping", "-c", "1", "-W", "15", "10.40.0.9", text=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if next(p for p in d.get("/v1/pods") if p["name"] == "late")["held"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the ping to the missing pod was not held")
    assert sandbox.netns("late") == late
    out, _ = ping.communicate(timeout=20)
    assert "1 received" in out, out
    assert next(p for p in d.get("/v1/pods") if p["name"] == "late")["attached"]


def test_sighup_keeps_what_the_api_created_and_applies_dns_changes(sandbox: Sandbox) -> None:
    """A controller's pods and namespaces survive a reload of an unchanged file; a file
    that changes the DNS domain is answered under the new zone at once (and the pod's
    resolv.conf searches it), with no restart."""
    from fabric.control.client import ControlClient

    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    api = ControlClient(d.control)
    c = sandbox.netns("c")
    api.put("/v1/namespaces/shop/pods/c", {"name": "c", "ip": "10.40.0.4", "netns": c})
    other = sandbox.netns("other")
    api.put("/v1/namespaces/ctl", {"name": "ctl", "cidr": "10.41.0.0/24", "pods": [
        {"name": "x", "ip": "10.41.0.2", "netns": other}]})
    d.wait_attached(4)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reloaded" in d.log(), d.log()
    pods = {(p["namespace"], p["name"]): p for p in d.get("/v1/pods")}
    assert pods[("shop", "c")]["attached"] and pods[("ctl", "x")]["attached"], pods
    assert "1 received" in sandbox.run(c, "ping", "-c", "1", "-W", "3", "10.40.0.2").stdout
    # The file changes the domain: applied in place, the controller's pod still there.
    ns["dns"] = {"domain": "corp.example"}
    d.write_config({"namespaces": [ns]})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out = sandbox.run(a, "dig", "@10.40.0.1", "+short", "+time=1", "+tries=1",
                          "c.shop.corp.example", check=False).stdout
        if "10.40.0.4" in out:
            break
        time.sleep(0.2)
    assert "10.40.0.4" in out, d.log()
    with open(f"/etc/netns/{a}/resolv.conf") as f:
        assert "shop.corp.example" in f.read()
    assert {(p["namespace"], p["name"]) for p in d.get("/v1/pods")} >= {("shop", "c"),
                                                                          ("ctl", "x")}
    # Dropping a namespace from the file is the one removal, and it is logged.
    d.write_config({"namespaces": []})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "no longer in" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "namespace shop removed: it is no longer in" in d.log()
    time.sleep(0.5)
    assert [n["name"] for n in d.get("/v1/namespaces")] == ["ctl"]
