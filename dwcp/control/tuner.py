"""The stream tuner: how many of a session's streams carry data, decided while data flows.

No fixed stream count is right everywhere (BENCHMARKS.md: on a short uncapped link one stream fills
the path and 64 lose 40 %; with 256 KiB windows over 100 ms, 64 streams are needed). The tuner turns
``Session.set_active_streams`` (a sender-side knob: paused streams stand by, the receiver needs no
notice) from what the session itself moves:

* **climb**: from the initial count (the Manager's plan when it knows the tier, else one stream) it
  doubles the active streams while each doubling raises goodput by ``gain`` (10 %); it quadruples
  instead while the active streams spend most of their time (``rwnd_limited``, 80 %) waiting for the
  receiver's window and the RTT shows no queue, since each then carries one window per RTT and no more;
  it stops once the smoothed RTT stands ``queue_slack`` (10 %) over the path's minimum (a queue is
  building: more streams only add loss), and cuts a probe short past ``abort_slack`` (50 %);
* **descend**: when a doubling does not pay, or a quadrupling may have overshot, it tries halving,
  keeping fewer streams while they move at least ``1 - slack`` (95 %) as much: a link that few streams
  fill is never flooded;
* **hold**: then it keeps the count, re-probing after ``reprobe_s`` of steady flow, when goodput moves
  by a third two windows running, or when told to (``reprobe()``: the Manager's re-probe events).

Before the first step the initial count's goodput must stop growing (slow start would make any count
look worse than the next). Each step waits max(``min_settle_s``, ``settle_rtts`` (1) RTT) for the
change to settle, plus, after adding streams, the RTTs of slow start they need to reach their share
(log2 of it over the 10-segment initial window, at most ``max_ramp_rtts``), and measures goodput (the
kernel's acknowledged bytes) over max(``min_window_s``, ``window_rtts`` (3) RTTs). A doubling that
inflates the smoothed RTT by half again without a matching gain is a queue filling, not progress.
Every change is a :class:`TunerStep` with its reason. Time comes from an injectable clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dwcp.errors import ConfigError, DWCPError

log = logging.getLogger(__name__)

#: What a resumed stream starts from: Linux's initial congestion window, 10 segments of ~1460 bytes.
INITIAL_WINDOW_BYTES = 14600


@dataclass(frozen=True)
class TunerStep:
    at_s: float            # seconds since the tuner started
    streams: int           # active streams from now on
    goodput_bps: float     # what the previous count moved (0 before the first measurement)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 3), "streams": self.streams, "goodput_bps": round(self.goodput_bps),
                "reason": self.reason}


@dataclass(frozen=True)
class Sample:
    """What one measurement window saw."""
    goodput_bps: float
    srtt_us: float
    retrans: int
    rwnd_limited: float = 0.0   # share of the active streams' busy time spent waiting for the receiver's window
    min_rtt_us: float = 0.0     # the smallest min RTT the kernel saw on the active streams


@dataclass(frozen=True)
class StreamsState:
    """The kernel's counters over the active streams (TCP_INFO), at one moment."""
    srtt_us: float = 0.0        # mean smoothed RTT
    retrans: int = 0            # retransmitted segments, all streams, cumulative
    rwnd_limited_us: int = 0    # cumulative, active streams
    busy_us: int = 0            # cumulative, active streams
    min_rtt_us: float = 0.0     # smallest tcpi_min_rtt of the active streams (0: none yet)


class SessionProbe:
    """Reads what the kernel says of a session's own streams (TCP_INFO): bytes the peer acknowledged,
    and per active stream the smoothed RTT and retransmits. Acknowledged bytes, not the engine's
    payload counter: the engine counts whole chunks when their ACK frames arrive (4 MiB steps on a
    100 Mbit/s link), which makes a short window's goodput read 0 or double."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def bytes_moved(self) -> int:
        from dwcp.telemetry.tcp_info import tcp_info
        total = 0
        for s in self.session.data_sockets():
            try:
                total += int(tcp_info(s).get("bytes_acked"))
            except OSError:
                continue
        return total

    def streams_state(self) -> StreamsState:
        from dwcp.telemetry.tcp_info import tcp_info
        rtts, retrans, rwnd_us, busy_us, min_rtt = [], 0, 0, 0, 0.0
        try:
            paused = self.session._engine.paused()
        except DWCPError:
            return StreamsState()
        for i, s in enumerate(self.session.data_sockets()):
            try:
                info = tcp_info(s)
            except OSError:
                continue
            retrans += int(info.get("total_retrans"))
            if i < len(paused) and not paused[i]:
                rtts.append(float(info.get("rtt_us")))
                rwnd_us += int(info.get("rwnd_limited_us"))
                busy_us += int(info.get("busy_time_us"))
                m = float(info.get("min_rtt_us"))
                if 0 < m < 4e9 and (min_rtt == 0 or m < min_rtt):  # ~0U: no sample yet
                    min_rtt = m
        return StreamsState(sum(rtts) / len(rtts) if rtts else 0.0, retrans, rwnd_us, busy_us, min_rtt)


class StreamTuner:
    """Adapts ``session``'s active stream count while it sends; see the module doc.

    Use as a context manager (or start()/stop()); it idles while nothing moves, so it can stay
    attached to a session across transfers and keep what it learned."""

    def __init__(self, session: Any, *, initial: int, min_streams: int = 1, max_streams: int | None = None,
                 gain: float = 0.10, slack: float = 0.05, rtt_inflation: float = 1.5,
                 rwnd_limited: float = 0.8, ramp_windows: int = 1, max_ramp_rtts: float = 6.0,
                 queue_slack: float = 0.10, abort_slack: float = 0.5, long_path_us: float = 20_000,
                 min_window_s: float = 0.2, window_rtts: float = 3.0, settle_rtts: float = 1.0,
                 min_settle_s: float = 0.1, reprobe_s: float = 10.0, poll_s: float = 0.02,
                 probe: SessionProbe | None = None, clock: Callable[[], float] = time.monotonic,
                 on_step: Callable[[TunerStep], None] | None = None, initial_reason: str = "") -> None:
        total = int(session.params.streams)
        max_streams = total if max_streams is None else min(max_streams, total)
        if not 1 <= min_streams <= max_streams:
            raise ConfigError(f"stream tuner: need 1 <= min_streams ({min_streams}) <= max_streams ({max_streams})")
        self.session = session
        self.min_streams, self.max_streams = min_streams, max_streams
        self.gain, self.slack, self.rtt_inflation = gain, slack, rtt_inflation
        self.rwnd_limited = rwnd_limited
        self.ramp_windows = ramp_windows
        self.max_ramp_rtts = max_ramp_rtts
        self.queue_slack, self.abort_slack = queue_slack, abort_slack
        self.long_path_us = long_path_us
        self.min_window_s, self.window_rtts = min_window_s, window_rtts
        self.settle_rtts, self.min_settle_s = settle_rtts, min_settle_s
        self.reprobe_s, self.poll_s = reprobe_s, poll_s
        self.probe = probe or SessionProbe(session)
        self.clock = clock
        self.on_step = on_step
        self.steps: list[TunerStep] = []
        self._t0 = clock()
        self._stop = threading.Event()
        self._reprobe = threading.Event()
        self._reprobe_reason = ""
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.current = min(max(initial, min_streams), max_streams)
        self.settled = self.current   # the count the last completed search chose (not a probe's)
        self._accepted = self.current
        self._apply(self.current, 0.0, f"initial: {initial_reason or f'{initial} requested'}, within "
                                       f"[{min_streams}, {max_streams}]")

    # ---- life cycle ------------------------------------------------------------------------------------
    def start(self) -> StreamTuner:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dwcp-stream-tuner", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> StreamTuner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reprobe(self, reason: str = "asked to re-probe") -> None:
        """Measure again from the current count (the path may have changed)."""
        self._reprobe_reason = reason
        self._reprobe.set()

    # ---- the loop ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except DWCPError as e:
            # The session closed or failed under us: its transfer reports that; we just stop.
            log.debug("stream tuner stopped: %s", e)
        except BaseException as e:  # pragma: no cover - a bug; keep it visible to stats()
            self.error = e
            log.exception("stream tuner failed")

    def _sleep(self, s: float) -> bool:
        """Sleep s seconds; False if told to stop."""
        return not self._stop.wait(max(0.0, s))

    def _wait_for_flow(self) -> bool:
        last = self.probe.bytes_moved()
        while not self._stop.is_set():
            if not self._sleep(self.poll_s):
                return False
            now = self.probe.bytes_moved()
            if now > last:
                return True
            last = now
        return False

    def _measure(self, added: int = 0, share_bps: float = 0.0) -> Sample | None:
        """Settle after a change, then goodput over the window; None if the flow stopped (idle).
        added: streams were just resumed, and each restarts from the initial window (10 segments):
        slow start doubles it every RTT, so one needs log2(its share of a window / 10 segments) RTTs
        to carry its share (share_bps: the per-stream rate before the change)."""
        k = self.probe.streams_state()
        rtt = k.srtt_us / 1e6
        ramp = 0.0
        if added:
            window_bytes = share_bps / 8 * rtt
            ramp = min(self.max_ramp_rtts, max(1.0, math.ceil(math.log2(max(window_bytes, 1.0) / INITIAL_WINDOW_BYTES))))
        settle = self.settle_rtts + ramp
        # After adding streams, watch the RTT while waiting: once the bottleneck queue fills, the probe
        # has its answer, and every further RTT of it only adds losses a long path pays for in seconds.
        watch = added > 0 and k.min_rtt_us >= 1000
        if not self._wait(max(self.min_settle_s, settle * rtt), watch):
            return None
        window = max(self.min_window_s, self.window_rtts * rtt)
        b0, t0, k0 = self.probe.bytes_moved(), self.clock(), self.probe.streams_state()
        if not self._wait(window, watch):
            return None
        b1, t1, k1 = self.probe.bytes_moved(), self.clock(), self.probe.streams_state()
        if b1 <= b0:
            return None
        busy = k1.busy_us - k0.busy_us
        # The active set may differ between k0 and k1 only if someone else changed it; a negative
        # delta then reads as "not window-limited".
        rwnd = (k1.rwnd_limited_us - k0.rwnd_limited_us) / busy if busy > 0 else 0.0
        return Sample((b1 - b0) * 8 / max(t1 - t0, 1e-6), k1.srtt_us, k1.retrans - k0.retrans,
                      min(max(rwnd, 0.0), 1.0), k1.min_rtt_us)

    def _wait(self, seconds: float, watch: bool) -> bool:
        """Sleep seconds (False if told to stop); with watch, return early once the RTT shows a queue."""
        if not watch:
            return self._sleep(seconds)
        end = self.clock() + seconds
        while True:
            left = end - self.clock()
            if left <= 0:
                return True
            if not self._sleep(min(left, max(self.poll_s, 0.05))):
                return False
            k = self.probe.streams_state()
            if k.min_rtt_us >= 1000 and k.srtt_us > (1 + self.abort_slack) * k.min_rtt_us:
                return True

    def _apply(self, n: int, goodput: float, reason: str) -> None:
        n = self.session.set_active_streams(n)
        self.current = n
        step = TunerStep(self.clock() - self._t0, n, goodput, reason)
        self.steps.append(step)
        log.info("streams -> %d: %s", n, reason)
        if self.on_step is not None:
            try:
                self.on_step(step)
            except Exception:
                log.exception("stream tuner on_step callback failed")

    def _better(self, new: Sample, old: Sample, more: bool) -> tuple[bool, str]:
        """Whether the new count beats the old one, and why (in words)."""
        ratio = new.goodput_bps / max(old.goodput_bps, 1.0)
        if more:
            inflated = old.srtt_us > 0 and new.srtt_us > self.rtt_inflation * old.srtt_us
            if ratio >= 1 + self.gain and not (inflated and ratio < 1 + 2 * self.gain):
                return True, f"goodput x{ratio:.2f}"
            why = f"goodput x{ratio:.2f} (< x{1 + self.gain:.2f} needed)"
            if inflated:
                why += f", RTT {old.srtt_us / 1e3:.1f} -> {new.srtt_us / 1e3:.1f} ms (queue filling)"
            if new.retrans > 2 * max(old.retrans, 1):
                why += f", retransmits {old.retrans} -> {new.retrans}"
            return False, why
        if ratio >= 1 - self.slack:
            return True, f"fewer streams keep x{ratio:.2f} of the goodput"
        return False, f"fewer streams move only x{ratio:.2f}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._wait_for_flow():
                return
            base = self._ramped()
            if base is None:
                continue
            self._search(base)
            self._hold()

    def _ramped(self) -> Sample | None:
        """The current count's goodput once it stops growing (at most ``ramp_windows`` windows):
        measured in slow start, any count looks worse than the one probed after it, and the tuner
        would keep streams the path does not need. Streams already waiting on the receiver's window
        are past slow start: no need to wait."""
        base = self._measure()
        for _ in range(self.ramp_windows):
            if base is None:
                return None
            if base.rwnd_limited >= self.rwnd_limited:
                break
            s = self._measure()
            if s is None:
                return None
            grew = s.goodput_bps > base.goodput_bps * (1 + self.gain)
            base = s
            if not grew:
                break
        return base

    def _search(self, base: Sample) -> None:
        """Climb by doubling while it pays, then descend by halving while it costs nothing."""
        self._accepted = self.current
        try:
            self._search_from(base)
        finally:
            if self.current != self._accepted and not self._stop.is_set():
                self._apply(self._accepted, 0.0, f"flow stopped during a probe: back to {self._accepted}")
            self.settled = self._accepted

    def _search_from(self, base: Sample) -> None:
        n, cur = self.current, base
        climbed = False
        worse_below = 0   # a count known to move less than n (descending stops above it)
        last_jump, last_gain = 1, 1.0
        while n < self.max_streams and not self._stop.is_set():
            if self._queue_building(cur):
                self._note(n, cur, f"holding {n}: RTT {cur.srtt_us / 1e3:.1f} ms is x{cur.srtt_us / cur.min_rtt_us:.2f} "
                                   f"its minimum {cur.min_rtt_us / 1e3:.1f} ms, the path is full (a queue is building)")
                break
            # Streams that spend most of their time waiting for the receiver's window each carry a
            # window per RTT, no more: more streams add throughput nearly linearly until the path
            # fills, so step by 4 instead of 2 (fewer steps on long paths, where each costs RTTs).
            # Only when the path shows no queue: near its capacity a jump by 4 resumes a burst of
            # streams in slow start that overflows the bottleneck queue, and on a long path the
            # losses (RTO backoff, halved windows) cost seconds after the tuner backs off.
            no_queue = cur.min_rtt_us <= 0 or cur.srtt_us <= 1.1 * cur.min_rtt_us
            factor = 4 if cur.rwnd_limited >= self.rwnd_limited and no_queue else 2
            m = min(factor * n, self.max_streams)
            why_step = f", {cur.rwnd_limited:.0%} of the time window-limited" if factor == 4 else ""
            self._apply(m, cur.goodput_bps,
                        f"probe up: {n} -> {m} streams ({_mbit(cur.goodput_bps)} with {n}{why_step})")
            s = self._measure(added=m - n, share_bps=cur.goodput_bps / max(n, 1))
            if s is None:
                return
            ok, why = self._better(s, cur, more=True)
            if not ok:
                self._apply(n, s.goodput_bps, f"back to {n}: {m} streams gave {why}")
                break
            worse_below, last_jump = n, m // n
            last_gain = s.goodput_bps / max(cur.goodput_bps, 1.0)
            n, cur, climbed = m, s, True
            self._accepted = n
            self.steps[-1] = TunerStep(self.steps[-1].at_s, m, self.steps[-1].goodput_bps,
                                       self.steps[-1].reason + f"; kept ({why})")
        # A jump by 4 that gained x2.5 or more scaled nearly linearly: half the count would have moved
        # at most x2 of the old one, less than the new count gives, so there is nothing to trim.
        if climbed and (last_jump <= 2 or last_gain >= 2.5):
            return
        # The first doubling did not pay, or the last step jumped by 4 and may have overshot the
        # count that fills the path: fewer streams may move as much. Halve while they do, never down
        # to a count already seen moving less. Not on long paths after a failed doubling: there the
        # streams left take seconds to grow into a retired one's share (bench/wan, 100-200 ms), which
        # costs more than the streams cost.
        if not climbed and cur.min_rtt_us >= self.long_path_us:
            self._note(n, cur, f"keeping {n}: on a {cur.min_rtt_us / 1e3:.0f} ms path the remaining streams "
                               "would need seconds to take over a retired one's share")
            return
        while n > self.min_streams and n // 2 > worse_below and not self._stop.is_set():
            m = max(n // 2, self.min_streams)
            self._apply(m, cur.goodput_bps, f"probe down: {n} -> {m} streams ({_mbit(cur.goodput_bps)} with {n})")
            s = self._measure()
            if s is None:
                return
            ok, why = self._better(s, cur, more=False)
            if not ok:
                self._apply(n, s.goodput_bps, f"back to {n}: {m} streams: {why}")
                return
            n, cur = m, s
            self._accepted = n

    def _queue_building(self, cur: Sample) -> bool:
        """The smoothed RTT stands well above the path's minimum: the bottleneck queue is filling, so
        more streams would only add loss and delay. Ignored on sub-millisecond paths, where
        scheduling jitter alone doubles an RTT."""
        return (cur.min_rtt_us >= 1000 and cur.srtt_us > (1 + self.queue_slack) * cur.min_rtt_us)

    def _note(self, n: int, cur: Sample, reason: str) -> None:
        step = TunerStep(self.clock() - self._t0, n, cur.goodput_bps, reason)
        self.steps.append(step)
        log.info("streams stay %d: %s", n, reason)

    def _hold(self) -> None:
        """Keep the count; return to search after reprobe_s of flow, a goodput shift, or reprobe()."""
        ref = self._measure()
        if ref is None:
            return
        since = self.clock()
        shifted = 0
        while not self._stop.is_set():
            if self._reprobe.is_set():
                self._reprobe.clear()
                log.info("stream tuner re-probes: %s", self._reprobe_reason)
                return
            s = self._measure()
            if s is None:
                return
            # Two windows in a row a third away from the reference: one noisy window (a loopback
            # scheduling hiccup, a loss burst) is not a changed path.
            shifted = shifted + 1 if abs(s.goodput_bps - ref.goodput_bps) > ref.goodput_bps / 3 else 0
            if shifted >= 2:
                log.info("stream tuner re-probes: goodput moved %s -> %s", _mbit(ref.goodput_bps), _mbit(s.goodput_bps))
                return
            if self.clock() - since >= self.reprobe_s:
                return

    def stats(self) -> dict[str, Any]:
        return {"streams": self.settled, "active": self.current, "changes": [s.to_json() for s in self.steps],
                "error": repr(self.error) if self.error else None}


def _mbit(bps: float) -> str:
    return f"{bps / 1e6:,.0f} Mbit/s"
