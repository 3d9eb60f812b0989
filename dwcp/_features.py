"""What this build and host can do: dwcp.backend, dwcp.backend_features, dwcp.feature_report().

Computed once, on first use (it probes the kernel with a throwaway socket). Tests assert it, the CLI
prints it, and mode selection reads it.
"""

from __future__ import annotations

import functools
import os
import ssl


@functools.lru_cache(maxsize=1)
def feature_report() -> dict[str, dict[str, object]]:
    """{feature: {"available": bool, "reason": str}} for every feature DWCP knows about."""
    report: dict[str, dict[str, object]] = {}

    def put(name: str, ok: bool, reason: str) -> None:
        report[name] = {"available": ok, "reason": reason}

    try:
        from dwcp import _core
    except ImportError as e:
        put("cext", False, f"compiled core not importable ({e}); run `make` or `pip install .`")
        core = None
    else:
        put("cext", True, "dwcp._core is built")
        core = _core.features()
    if core is None:
        for name in ("zerocopy", "crc32c_hw", "xxh3"):
            put(name, False, "needs the compiled core")
    else:
        put("zerocopy", bool(core.get("zerocopy")),
            "SO_ZEROCOPY accepted by the kernel" if core.get("zerocopy") else "kernel refuses SO_ZEROCOPY")
        put("crc32c_hw", bool(core.get("crc32c_hw")),
            "SSE4.2 crc32 instructions" if core.get("crc32c_hw") else "CPU lacks SSE4.2: table CRC32C")
        put("xxh3", bool(core.get("xxh3")), "XXH3 payload checksums")
    put("tls", ssl.HAS_TLSv1_3, f"{ssl.OPENSSL_VERSION} (data path runs in the Python engine)")
    from dwcp.telemetry.ebpf_source import ebpf_available  # cheap: no program is loaded
    put("ebpf", *ebpf_available())
    put("rdma", *_rdma())
    return report


def _rdma() -> tuple[bool, str]:
    try:
        import pyverbs.device as d  # type: ignore[import-not-found]
    except ImportError:
        return False, "pyverbs not installed (Debian python3-pyverbs)"
    try:
        devices = d.get_device_list()
    except Exception as e:  # pyverbs raises PyverbsRDMAError when no device exists
        return False, f"no RDMA device: {e}"
    return (bool(devices), f"{len(devices)} RDMA device(s)" if devices else "no RDMA device")


def backend_features() -> frozenset[str]:
    return frozenset(name for name, f in feature_report().items() if f["available"])


def backend() -> str:
    """'cext' when the compiled core is in use, 'python' when DWCP_BACKEND=python or it is missing."""
    if os.environ.get("DWCP_BACKEND") == "python" or "cext" not in backend_features():
        return "python"
    return "cext"
