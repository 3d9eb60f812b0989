"""netlab: reproducible WAN links on one machine.

Two "hosts" are network namespaces; between them a delay line (a C program, its own process) holds a
TUN device in each and applies a rate-limited bottleneck queue, RTT/2 of delay per direction, random
per-packet loss and optionally a replayed bandwidth trace. Needs root.

    from dwcp import netlab
    with netlab.link(rtt_ms=50, rate_mbit=1000, loss=0.001) as lab:
        server = lab.b.popen(["iperf3", "-s", "-1"])
        lab.a.run(["iperf3", "-c", lab.b.addr, "-t", "5"], check=True)
        print(lab.stats()["directions"]["a_to_b"])

``netlab.veth(rate_mbit=None, loss=0.0)`` joins the hosts with a veth pair instead (microseconds of RTT,
as fast as the CPUs, optionally tbf-shaped): links faster than the delay line's ~4 Gbit/s ceiling.

See docs/netlab.md for parameters, the stats fields and the fidelity measured on this machine."""

from ._cleanup import down, down_all, leftovers
from ._lab import Host, Lab, attach, link, up
from ._params import DEFAULT_SUBNET, LinkParams, bdp_bytes, load_trace
from ._state import list_labs
from ._system import check_host, delayline_path
from ._veth import veth

__all__ = ["DEFAULT_SUBNET", "Host", "Lab", "LinkParams", "attach", "bdp_bytes", "check_host",
           "delayline_path", "down", "down_all", "leftovers", "link", "list_labs", "load_trace", "up", "veth"]
