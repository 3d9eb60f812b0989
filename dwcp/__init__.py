"""DWCP: striped multi-stream bulk transport.

    import dwcp
    with dwcp.listen(":7000", key=KEY) as lis:          # server
        with lis.accept() as s:
            data = s.recv()
    with dwcp.connect("host:7000", key=KEY, streams=8) as s:   # client
        s.send(buffer)

``dwcp.backend`` names the data path in use and ``dwcp.backend_features`` what this build and host can
do ({"cext", "zerocopy", "crc32c_hw", "xxh3", "tls", ...}).
"""

from typing import TYPE_CHECKING, Any

from dwcp._lazy import lazy_attr
from dwcp.errors import (AdmissionDenied, AuthError, CapabilityError, ConfigError, DWCPError,
                         InsufficientBandwidth, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferAborted, TransferTimeout, TransportError)

if TYPE_CHECKING:
    from dwcp._features import feature_report
    from dwcp.control.connect import connect
    from dwcp.transport.listener import Listener, listen
    from dwcp.transport.session import BufferTooSmall, Session

# dwcp.connect is the transport's, plus streams="auto" (the control plane's tuner, imported only then).
# The transport (sockets, ssl, telemetry) and the feature probe are imported on first use, so that
# `import dwcp` -- and every `dwcp` command that does not need them, like `dwcp hde` -- starts fast.
_LAZY = {"BufferTooSmall": "dwcp.transport", "Listener": "dwcp.transport", "Session": "dwcp.transport",
         "connect": "dwcp.control.connect", "listen": "dwcp.transport", "feature_report": "dwcp._features"}

__version__ = "0.1.0"

__all__ = [
    "AdmissionDenied", "AuthError", "BufferTooSmall", "CapabilityError", "ConfigError", "DWCPError",
    "InsufficientBandwidth", "Listener", "PeerClosedError", "ProtocolError", "Session",
    "SessionClosedError", "TransferAborted", "TransferTimeout", "TransportError", "__version__", "backend",
    "backend_features", "connect", "feature_report", "listen",
]


def __getattr__(name: str) -> Any:
    if name in ("backend", "backend_features"):
        # Computed on first access: probing the kernel at import time would slow every `import dwcp`.
        from dwcp import _features
        return _features.backend_features() if name == "backend_features" else _features.backend()
    return lazy_attr(globals(), __name__, _LAZY, name)
