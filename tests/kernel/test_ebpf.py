"""The eBPF telemetry source against real kernel programs: byte counts and RTTs of flows the test
makes, namespace attribution over a netlab link, open/close events, filters, both tcp_probe hook kinds,
the sockops cgroup scope, and that nothing of ours stays in the kernel after close (or after a crash).

Waits are bounded polls for a state the kernel reaches (a flow showing up, an object being freed),
never assertions on how long something took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dwcp.telemetry.sample import FlowFilter, FlowSample
from tests.kernel.conftest import wait_for

kernel = pytest.mark.kernel
SO_COOKIE = 57


@pytest.fixture
def ebpf_ready() -> None:
    from dwcp.telemetry.ebpf_source import ebpf_available
    ok, why = ebpf_available()
    if not ok:
        pytest.skip(f"eBPF telemetry unavailable: {why}")


def cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def bpftool_objects(kind: str) -> dict[int, str]:
    out = subprocess.run(["bpftool", kind, "show", "--json"], capture_output=True, text=True, check=True)
    return {int(o["id"]): str(o.get("name", "")) for o in json.loads(out.stdout or "[]")}


def transfer(host: str, nbytes: int) -> tuple[socket.socket, socket.socket]:
    """A connected pair on host; nbytes from the client to the server, all read. Both stay open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(1)
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect(ls.getsockname()[:2])
    s, _ = ls.accept()
    ls.close()
    payload = b"\xa5" * nbytes
    got = 0
    view = memoryview(payload)
    sent = 0
    c.setblocking(False)
    while got < nbytes:
        if sent < nbytes:
            try:
                sent += c.send(view[sent:sent + (1 << 20)])
            except BlockingIOError:
                pass
        s.settimeout(0.001 if sent < nbytes else 10)
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            continue
        assert chunk, "server saw EOF early"
        got += len(chunk)
    c.setblocking(True)
    return c, s


def by_cookie(samples: list[FlowSample]) -> dict[int, FlowSample]:
    return {x.cookie: x for x in samples}


# ------------------------------------------------------------------------------------------------


@kernel
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("hook", ["tp_btf", "tracepoint"])
def test_loopback_flow_bytes_rtt_events_and_port_filter(ebpf_ready: None, hook: str, host: str) -> None:
    from dwcp.telemetry.ebpf_source import EbpfSource

    nbytes = 3 * 1024 * 1024 + 4321
    # the port filter is set per source; reserve a port first so the filter can name it
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with EbpfSource(hook=hook) as everything:
        assert everything.hook == hook and hook in everything.hook_reason
        c, s = transfer(host, nbytes)
        other_c, other_s = transfer(host, 1000)          # a second flow, on other ports
        ck_c, ck_s, ck_other = cookie(c), cookie(s), cookie(other_c)
        port = s.getsockname()[1]

        def settled() -> dict[int, FlowSample] | None:
            seen = by_cookie(everything.snapshot())
            if ck_c in seen and ck_s in seen and seen[ck_c].bytes_acked >= nbytes:
                return seen
            return None

        seen = wait_for(settled, "the client's sample showing every byte acknowledged")
        cl, sv = seen[ck_c], seen[ck_s]
        assert ck_other in seen
        netns = os.stat("/proc/self/ns/net").st_ino
        for x in (cl, sv):
            assert x.source == "ebpf" and x.netns == netns and x.state == "ESTABLISHED"
            assert x.daddr == (host if family == socket.AF_INET else "::1")
            assert 0 < x.min_rtt_us <= x.srtt_us < 1_000_000, x
            assert x.mss > 0 and x.cwnd > 0
        assert (cl.sport, cl.dport) == (c.getsockname()[1], port)
        assert (sv.sport, sv.dport) == (port, c.getsockname()[1])
        # the SYN counts as one acknowledged byte in the kernel's own tcpi_bytes_acked
        assert abs(cl.bytes_acked - nbytes) <= cl.mss, (cl.bytes_acked, nbytes, cl.mss)
        assert abs(sv.bytes_received - nbytes) <= sv.mss, (sv.bytes_received, nbytes, sv.mss)
        assert cl.bytes_sent >= nbytes
        if hook == "tp_btf":
            assert cl.pid == os.getpid()    # learned at SYN_SENT, in connect()'s context

        opens = wait_for(lambda: [e for e in everything.events() if e.kind == "open"],
                         "open events")
        open_cookies = {e.cookie for e in opens}
        assert {ck_c, ck_s} <= open_cookies
        for e in opens:
            if e.cookie == ck_c:
                assert (e.sport, e.dport, e.new_state) == (cl.sport, port, "ESTABLISHED")

        # a source filtered on this port sees exactly this pair, not the other flow
        with EbpfSource(FlowFilter(ports=frozenset({port})), hook=hook) as filtered:
            s.sendall(b"y" * 100000)        # traffic after attach, so tcp_probe sees both ends
            c.recv(1)                       # (the server's bytes reach the client; it reads one)
            fl = wait_for(lambda: by_cookie(filtered.snapshot()) if len(filtered.snapshot()) >= 2 else None,
                          "both ends of the filtered flow")
            assert set(fl) == {ck_c, ck_s}

        other_c.close()
        other_s.close()
        c.close()
        s.close()
        closes: dict[int, Any] = {}

        def closed() -> bool:
            for e in everything.events():
                if e.kind == "close":
                    closes[e.cookie] = e
            return ck_c in closes and ck_s in closes

        wait_for(closed, "close events of both ends")
        assert closes[ck_c].new_state == "CLOSE"
        finals = by_cookie(everything.final_samples())
        assert abs(finals[ck_c].bytes_acked - nbytes) <= finals[ck_c].mss
        assert finals[ck_s].bytes_received >= nbytes
        # delivered close events take the flows out of the snapshot
        left = by_cookie(everything.snapshot())
        assert ck_c not in left and ck_s not in left
        assert everything.events_dropped == 0


SERVER = textwrap.dedent("""
    import socket, sys
    ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    c, _ = ls.accept()
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode())
    c.close()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    c.sendall(b"z" * int(sys.argv[3]))
    c.shutdown(socket.SHUT_WR)
    print(c.recv(100).decode(), flush=True)
""")


@kernel
def test_flows_in_netlab_namespaces_are_attributed(ebpf_ready: None, wan_link: Callable[..., Any]) -> None:
    from dwcp.telemetry.ebpf_source import EbpfSource

    rtt_ms = 20.0
    lab = wan_link(rtt_ms=rtt_ms, rate_mbit=200)
    ino_a = os.stat(f"/run/netns/{lab.a.ns}").st_ino
    ino_b = os.stat(f"/run/netns/{lab.b.ns}").st_ino
    port, nbytes = 5201, 2_000_000
    with EbpfSource(FlowFilter(ports=frozenset({port}))) as src, \
            EbpfSource(FlowFilter(netns=ino_b)) as only_b:
        server = lab.b.popen([sys.executable, "-c", SERVER, lab.b.addr, str(port)],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            out = lab.a.run([sys.executable, "-c", CLIENT, lab.b.addr, str(port), str(nbytes)],
                            capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert int(out.stdout) == nbytes
        finally:
            server.wait(timeout=30)
        finals: list[FlowSample] = []

        def both_closed() -> bool:
            src.events()                      # delivers close events, which keep the final samples
            finals.extend(src.final_samples())
            return len({x.netns for x in finals}) == 2

        wait_for(both_closed, "close events of both ends")
        assert {x.netns for x in finals} == {ino_a, ino_b}
        client = next(x for x in finals if x.netns == ino_a)
        server_side = next(x for x in finals if x.netns == ino_b)
        assert (client.saddr, client.daddr, client.dport) == (lab.a.addr, lab.b.addr, port)
        assert abs(client.bytes_acked - nbytes) <= client.mss
        assert abs(server_side.bytes_received - nbytes) <= server_side.mss
        # the delay line holds every packet rtt/2 each way: no RTT sample can be shorter
        assert client.min_rtt_us >= 0.9 * rtt_ms * 1000, client
        assert client.min_rtt_us <= client.srtt_us < 20 * rtt_ms * 1000, client
        # the namespace filter (in the kernel) kept only host b's side
        only = only_b.events()
        assert {e.kind for e in only} == {"open", "close"} and {e.netns for e in only} == {ino_b}
        assert [x.netns for x in only_b.final_samples()] == [ino_b]


@kernel
def test_close_leaves_no_program_or_map(ebpf_ready: None) -> None:
    from dwcp.telemetry.ebpf_source import EbpfSource

    src = EbpfSource()
    progs, maps = src.kernel_ids()
    # probe + state + sockops (+ the iter/tcp seeding program in tp_btf mode); flows, events, rodata, bss
    assert len(progs) == (4 if src.hook == "tp_btf" else 3) and len(maps) >= 2
    live_progs, live_maps = bpftool_objects("prog"), bpftool_objects("map")
    assert all(live_progs[i].startswith("dwcp_") for i in progs), {i: live_progs.get(i) for i in progs}
    names = {live_maps[i] for i in maps}
    assert {"dwcp_flows", "dwcp_events"} <= names and all(n.startswith("dwcp_") for n in names), names
    src.close()
    src.close()                                          # idempotent
    assert src.closed
    wait_for(lambda: not (set(progs) & set(bpftool_objects("prog"))), "our programs unloaded")
    wait_for(lambda: not (set(maps) & set(bpftool_objects("map"))), "our maps freed")


CRASHER = textwrap.dedent("""
    import json, time
    from dwcp.telemetry.ebpf_source import EbpfSource
    src = EbpfSource()
    print(json.dumps(src.kernel_ids()), flush=True)
    time.sleep(600)
""")


@kernel
def test_killed_process_leaves_no_program_or_map(ebpf_ready: None) -> None:
    p = subprocess.Popen([sys.executable, "-c", CRASHER], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        progs, maps = json.loads(p.stdout.readline())
        assert set(progs) <= set(bpftool_objects("prog"))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    wait_for(lambda: not (set(progs) & set(bpftool_objects("prog"))), "programs of the killed process gone")
    wait_for(lambda: not (set(maps) & set(bpftool_objects("map"))), "maps of the killed process gone")


@pytest.fixture
def child_cgroup() -> Iterator[str]:
    from dwcp.telemetry.ebpf_source import default_cgroup
    root = default_cgroup()
    if root is None:
        pytest.skip("no cgroup v2 mount for the sockops program")
    path = os.path.join(root, f"dwcp-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except OSError:       # EBUSY while the exiting child is still being reaped
                time.sleep(0.05)


PAIR_IN_CGROUP = textwrap.dedent("""
    import os, socket, sys
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
        f.write("0")                                   # move this process before making sockets
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    c.sendall(b"q" * 500000)
    n = 0
    while n < 500000:
        n += len(s.recv(1 << 20))
    s.sendall(b"done")
    c.recv(4)
    ck = int.from_bytes(c.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
    print(ck, c.getsockname()[1], flush=True)
    sys.stdin.read()                                   # keep the flow open until the test says so
""")


@kernel
def test_sockops_scoped_to_a_cgroup(ebpf_ready: None, child_cgroup: str) -> None:
    from dwcp import _ebpf

    progs = _ebpf.Programs(cgroup=child_cgroup)
    try:
        assert progs.sockops
        child = subprocess.Popen([sys.executable, "-c", PAIR_IN_CGROUP, child_cgroup],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            ck_in, _ = map(int, child.stdout.readline().split())
            c, s = transfer("127.0.0.1", 500000)          # this process: outside the cgroup
            ck_out = cookie(c)

            def flags() -> dict[int, int] | None:
                f = {x["cookie"]: x["flags"] for x in progs.flows()}
                return f if ck_in in f and ck_out in f else None

            f = wait_for(flags, "both flows in the map")
            assert f[ck_in] & _ebpf.FLOW_BY_SOCKOPS, "the sockops program missed a flow of its cgroup"
            assert not f[ck_out] & _ebpf.FLOW_BY_SOCKOPS, "the sockops program saw a flow outside its cgroup"
            assert f[ck_out] & _ebpf.FLOW_BY_PROBE    # the tracepoints see every flow
            c.close()
            s.close()
        finally:
            if child.stdin:
                child.stdin.close()
            child.wait(timeout=30)
    finally:
        progs.close()


@kernel
def test_bad_options_are_config_errors(ebpf_ready: None) -> None:
    from dwcp import _ebpf
    from dwcp.errors import CapabilityError, ConfigError
    from dwcp.telemetry.ebpf_source import EbpfSource

    with pytest.raises(ConfigError):
        EbpfSource(hook="kprobe")
    with pytest.raises(ConfigError):
        EbpfSource(flows_max=-1)
    with pytest.raises(ConfigError):
        _ebpf.Programs(ports=range(1, 20))
    with pytest.raises(CapabilityError, match="cgroup"):
        EbpfSource(cgroup="/nonexistent-cgroup")


@kernel
def test_feature_report_and_unprivileged_reason(ebpf_ready: None) -> None:
    import dwcp
    assert "ebpf" in dwcp.backend_features
    code = ("import dwcp, json; from dwcp.telemetry.ebpf_source import ebpf_available; "
            "print(json.dumps([ebpf_available(), dwcp.feature_report()['ebpf']]))")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (ok, why), feature = json.loads(out.stdout)
    assert not ok and "CAP_BPF" in why and "root" in why
    assert feature == {"available": False, "reason": why}


@kernel
def test_flows_older_than_the_programs_are_seen_at_once(ebpf_ready: None) -> None:
    """tp_btf mode walks the namespace's sockets with iter/tcp when it attaches: idle flows that existed
    before show up (with an open event whose old_state is empty) without waiting for traffic."""
    from tests.conftest import tcp_pairs

    from dwcp.telemetry.ebpf_source import EbpfSource

    a, b = tcp_pairs(3)
    try:
        cookies = {cookie(x) for x in a + b}
        with EbpfSource(hook="tp_btf") as src:
            snap = by_cookie(src.snapshot())
            assert cookies <= set(snap)
            assert all(snap[c].state == "ESTABLISHED" and snap[c].netns == os.stat("/proc/self/ns/net").st_ino
                       for c in cookies)
            opens = {e.cookie: e for e in src.events() if e.kind == "open"}
            assert cookies <= set(opens) and all(opens[c].old_state == "" for c in cookies)
    finally:
        for x in a + b:
            x.close()


UNMOUNTED_TRACEFS = textwrap.dedent("""
    import json, os, subprocess
    # A fresh machine of ours boots with tracefs mounted nowhere; this private mount namespace is made
    # to look like one (the host's mounts are untouched).
    for path in ("/sys/kernel/debug/tracing", "/sys/kernel/tracing", "/sys/kernel/debug"):
        subprocess.run(["umount", "-l", path], capture_output=True)
    assert not os.path.exists("/sys/kernel/tracing/events"), "tracefs still mounted"
    from dwcp.telemetry.ebpf_source import EbpfSource
    with EbpfSource(hook="tracepoint", sockops=False) as src:
        print(json.dumps([src.hook, src.hook_reason, os.path.exists("/sys/kernel/tracing/events")]))
""")


@kernel
def test_tracepoint_hook_mounts_tracefs_on_a_fresh_machine(ebpf_ready: None) -> None:
    """The classic tracepoints attach by an id read from tracefs, which a newly booted machine has not
    mounted: the loader mounts it (as root) instead of failing with ENOENT."""
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                          UNMOUNTED_TRACEFS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hook, reason, mounted = json.loads(out.stdout)
    assert hook == "tracepoint" and "mounted tracefs" in reason and mounted


@kernel
def test_bad_cgroup_is_reported_before_any_program_loads(ebpf_ready: None, tmp_path: Any) -> None:
    """A cgroup that does not exist, or a directory that is not a cgroup v2 one, names the cgroup,
    whichever hook would have been tried (the tracepoint fallback used to hide it)."""
    from dwcp.errors import CapabilityError
    from dwcp.telemetry.ebpf_source import EbpfSource

    for hook in ("tp_btf", "tracepoint", None):
        with pytest.raises(CapabilityError, match="cgroup /nonexistent-cgroup"):
            EbpfSource(cgroup="/nonexistent-cgroup", hook=hook)
        with pytest.raises(CapabilityError, match="not a cgroup v2 directory"):
            EbpfSource(cgroup=str(tmp_path), hook=hook)
