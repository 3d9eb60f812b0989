"""dwcp.connect(): the transport's connect, plus ``streams="auto"``, where the control plane picks the
stream count and keeps adjusting it while data flows.

With ``streams="auto"`` the session opens ``auto_max_streams`` connections (64 unless the
configuration's transport.max_streams is lower; opening them costs one round trip, as all are joined
at once, and an idle connection costs nothing on the wire), makes the Manager's initial count active
(the tier's default, or transport.initial_streams) and attaches a :class:`StreamTuner` that pauses and
resumes streams as goodput, RTT and retransmits say (``session.attached("stream_tuner")``,
``session.stats()["attached"]``). Given a Manager, its re-probe events for this peer (tier change,
degraded link, a route or link going down) make the tuner measure again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dwcp.errors import ConfigError
from dwcp.transport.connect import connect as transport_connect

if TYPE_CHECKING:
    from dwcp.control.manager import Manager
    from dwcp.transport.session import Session

#: Streams an auto session opens when neither the caller nor the configuration says otherwise: enough
#: for every link of bench/wan's grid (100 ms with 256 KiB windows needs ~50 for 500 Mbit/s).
AUTO_MAX_STREAMS = 64


def connect(addr: str | tuple[str, int], *, streams: int | str = 4, manager: Manager | None = None,
            auto_max_streams: int | None = None, **kwargs: Any) -> Session:
    """Open a session to a DWCP server (see :func:`dwcp.transport.connect.connect` for every other
    argument). streams: 1..256, or "auto" (see the module doc). manager: the control plane whose plan
    and configuration an auto session follows (default: a plan from the configuration alone)."""
    if streams != "auto":
        if isinstance(streams, str):
            raise ConfigError(f"streams must be 1..256 or 'auto', got {streams!r}")
        return transport_connect(addr, streams=streams, **kwargs)
    from dwcp.control.tuner import StreamTuner

    min_streams, ceiling, initial = 1, auto_max_streams or AUTO_MAX_STREAMS, 0
    peer = ""
    if manager is not None:
        from dwcp.control.manager import peer_key
        from dwcp.transport.options import parse_address
        peer = peer_key(parse_address(addr)[0])
        plan = manager.plan(peer)
        if plan.tier is not None or isinstance(manager.config.transport.initial_streams, int):
            initial = plan.streams
        t = manager.config.transport
        min_streams = t.min_streams
        if auto_max_streams is None:
            ceiling = min(ceiling, t.max_streams)
    if not 1 <= ceiling <= 256:
        raise ConfigError(f"auto_max_streams must be 1..256, got {ceiling}")
    if manager is not None and not manager.config.features.adaptive_streams:
        # The operator turned the tuner off (features.adaptive_streams: false): the plan's count, fixed.
        return transport_connect(addr, streams=initial, **kwargs)
    session = transport_connect(addr, streams=max(ceiling, min_streams), **kwargs)
    try:
        why = f"{initial} from the Manager's plan"
        if not initial:
            initial, why = initial_from_rtt(session)
        tuner = StreamTuner(session, initial=initial, min_streams=min(min_streams, session.params.streams),
                            max_streams=session.params.streams, initial_reason=why)
        session.attach("stream_tuner", tuner)
        if manager is not None:
            unsubscribe = manager.subscribe(
                lambda e: tuner.reprobe(f"{e.kind}: {e.detail}") if e.reprobe and e.peer in (peer, "") else None)
            session.attach("manager_subscription", _Unsubscriber(unsubscribe))
        tuner.start()
    except BaseException:
        session.close()
        raise
    return session


#: Initial active streams of an auto session whose tier nobody knows yet, by the handshake's RTT. One
#: stream fills a short uncapped path (bench/wan: -P 1 at 97-100 % at 10 and 50 ms) and the tuner
#: climbs by 4 where windows cap each stream. On long paths a single flow spends seconds in slow start
#: and halves its window per loss, and retiring streams costs seconds while the others grow into the
#: freed share, so those start with the counts that filled every uncapped long link of the grid.
AUTO_INITIAL_BY_RTT_US: tuple[tuple[float, int], ...] = ((20_000, 1), (80_000, 4), (float("inf"), 8))


def initial_from_rtt(session: Session) -> tuple[int, str]:
    from dwcp.telemetry.tcp_info import tcp_info
    try:
        rtt_us = float(tcp_info(session.control_socket()).get("min_rtt_us"))
    except OSError:
        rtt_us = 0.0
    if not 0 < rtt_us < 4e9:   # ~0U: the kernel has no sample
        return 1, "no RTT measured yet: one stream"
    n = next(k for limit, k in AUTO_INITIAL_BY_RTT_US if rtt_us < limit)
    return n, f"{n} for a {rtt_us / 1e3:.1f} ms path (handshake RTT)"


class _Unsubscriber:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def stop(self) -> None:
        self.fn()

    def stats(self) -> dict[str, Any]:
        return {}

