"""A veth link: two hosts joined by a veth pair instead of the delay line.

For links the delay line cannot emulate: its ceiling is ~4 Gbit/s and it adds >= 0.2 ms of RTT, while a
data-centre link has microseconds of RTT and 10+ Gbit/s (tier 1), and a short fast link has ~0 RTT and
a few Gbit/s (tier 2). The pair is as fast as the CPUs move packets; ``rate_mbit`` shapes both
directions with ``tbf`` on each sender's veth (no drops: TCP small queues push back on the sender, so
the rate holds but the queue is the sender's own). ``loss`` drops that fraction of the packets arriving
at b (a->b data) with a seven-instruction tc BPF classifier (this kernel has no netem and no tc drop
actions); on veth a "packet" is a whole GSO batch of up to 64 KiB, so the loss comes in bursts.

Same life cycle and state as the delay-line labs: `down`/`down_all` remove them."""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]  # no stubs, no py.typed
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from dwcp._netns import run_in_netns
from dwcp.errors import CapabilityError, ConfigError, DWCPError

from . import _state
from ._lab import Lab, _namespaces, _teardown
from ._params import DEFAULT_SUBNET, LinkParams, check_name
from ._system import check_host, ns_path, set_sysctls
from ._topology import create_namespace

log = logging.getLogger(__name__)
VETH_IFACE = "veth0"
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
TC_H_CLSACT_INGRESS = 0xFFFFFFF2


def loss_program(loss: float) -> bytes:
    """The classifier: drop (TC_ACT_SHOT) when prandom % 10^6 < loss x 10^6, else pass (TC_ACT_OK)."""
    threshold = int(round(loss * 1_000_000))

    def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
        return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)

    return b"".join([
        insn(0x85, imm=7),                    # call bpf_get_prandom_u32
        insn(0x94, dst=0, imm=1_000_000),     # w0 %= 1000000 (32-bit ALU: upper half zeroed)
        insn(0xA5, dst=0, off=2, imm=threshold),  # if r0 < threshold goto drop
        insn(0xB7, dst=0, imm=0),             # r0 = TC_ACT_OK
        insn(0x95),                           # exit
        insn(0xB7, dst=0, imm=2),             # drop: r0 = TC_ACT_SHOT
        insn(0x95),                           # exit
    ])


def _load_loss_program(loss: float) -> int:
    code = loss_program(loss)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII16s", attr, 0, _BPF_PROG_TYPE_SCHED_CLS, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log_buf),
                     ctypes.addressof(log_buf), 0, 0, b"netlab_loss")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(_BPF_PROG_LOAD), attr,
                          ctypes.c_long(128)))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (_errno.EPERM, _errno.EACCES):
            raise CapabilityError("netlab veth loss needs BPF (CAP_BPF/root) for its tc classifier")
        raise DWCPError(f"loading the netlab loss classifier failed: {os.strerror(err)}: "
                        f"{log_buf.value.decode(errors='replace')}")
    return fd


def _in_ns(ns: str, fn: Callable[[IPRoute], Any]) -> Any:
    """fn(IPRoute()) with the netlink socket opened inside namespace ``ns``."""
    def run() -> Any:
        with IPRoute() as ipr:
            return fn(ipr)
    return run_in_netns(ns_path(ns), run)


def _tbf(ipr: IPRoute, idx: int, rate_mbit: float) -> None:
    rate_Bps = rate_mbit * 1e6 / 8
    if rate_Bps >= 2**32:
        raise ConfigError(f"rate_mbit={rate_mbit}: veth shaping goes up to 34000 Mbit/s (tbf's 32-bit rate)")
    # Burst: 4 ms at the rate (>= 2 GSO batches) so the token bucket, not timer granularity, sets the rate.
    burst = max(int(rate_Bps * 0.004), 256 * 1024)
    ipr.tc("add", "tbf", idx, 0x10000, rate=f"{int(rate_Bps * 8)}bit", burst=burst, latency="20ms")


def veth(rate_mbit: float | None = None, loss: float = 0.0, subnet: str = DEFAULT_SUBNET,
         mtu: int = 1500, name: str | None = None, persistent: bool = False) -> Lab:
    """A lab whose hosts a and b are joined by a veth pair (see the module doc). Use it as a context
    manager; ``lab.stats()`` is not available (there is no delay line to count)."""
    name = check_name(name or f"pv{secrets.token_hex(5)}")
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"loss={loss}: a fraction in [0, 1) (0.001 is 0.1 %)")
    if not 1280 <= mtu <= 65535:
        raise ConfigError(f"mtu={mtu}: between 1280 and 65535 bytes")
    if rate_mbit is not None and rate_mbit <= 0:
        raise ConfigError(f"rate_mbit={rate_mbit}: must be > 0 (None: unshaped)")
    # LinkParams validates the subnet; the RTT is nominal (the veth adds microseconds).
    params = LinkParams(rtt_ms=0.2, rate_mbit=min(rate_mbit or 10_000.0, 10_000.0), loss=loss, subnet=subnet)
    check_host()
    ns_a, ns_b = _namespaces(name)
    p = params.to_dict()
    p.update({"kind": "veth", "rate_mbit": rate_mbit, "rtt_ms": 0.0, "mtu": mtu})
    state: dict[str, Any] = {"name": name, "params": p, "namespaces": [ns_a, ns_b], "iface": VETH_IFACE,
                             "pid": None, "persistent": persistent,
                             "owner_pid": None if persistent else os.getpid(),
                             "owner_start": None if persistent else _state.process_start(os.getpid()),
                             "created": time.time()}
    _state.claim(name)
    try:
        _state.write_state(name, state)
        for ns in (ns_a, ns_b):
            create_namespace(ns)
            set_sysctls(ns, {"net.ipv4.tcp_rmem": "4096 131072 33554432",
                             "net.ipv4.tcp_wmem": "4096 16384 33554432",
                             "net.ipv4.tcp_no_metrics_save": "1",
                             "net.ipv6.conf.all.disable_ipv6": "1",
                             "net.ipv6.conf.default.disable_ipv6": "1"})
        tmp_peer = f"vp{secrets.token_hex(4)}"

        def make_pair(ipr: IPRoute) -> None:
            ipr.link("add", ifname=VETH_IFACE, kind="veth", peer={"ifname": tmp_peer, "net_ns_fd": ns_b})
        _in_ns(ns_a, make_pair)

        def configure(ifname: str, addr: str, shape: bool, drop: bool) -> Callable[[IPRoute], None]:
            def run(ipr: IPRoute) -> None:
                idx = ipr.link_lookup(ifname=ifname)[0]
                if ifname != VETH_IFACE:
                    ipr.link("set", index=idx, ifname=VETH_IFACE)
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=idx, address=addr, prefixlen=params.network.prefixlen,
                         family=socket.AF_INET)
                ipr.link("set", index=idx, mtu=mtu, state="up")
                if shape and rate_mbit is not None:
                    _tbf(ipr, idx, rate_mbit)
                if drop:
                    fd = _load_loss_program(loss)
                    try:
                        ipr.tc("add", "clsact", idx)
                        ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="netlab_loss",
                               parent=TC_H_CLSACT_INGRESS, classid=1, direct_action=True)
                    finally:
                        os.close(fd)
            return run

        _in_ns(ns_a, configure(VETH_IFACE, params.addr_a, True, False))
        _in_ns(ns_b, configure(tmp_peer, params.addr_b, True, loss > 0))
    except NetlinkError as e:
        _cleanup_failed(name)
        raise DWCPError(f"building veth lab {name} failed: {e}") from e
    except BaseException:
        _cleanup_failed(name)
        raise
    log.info("netlab veth link %s up: rate %s Mbit/s, loss %s", name, rate_mbit, loss)
    return Lab(name, state, None)


def _cleanup_failed(name: str) -> None:
    try:
        _teardown(name, None)
    except BaseException as e:  # the original error matters more
        log.warning("clean-up after a failed netlab veth %s: %s", name, e)
