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

from typing import Any

from dwcp._features import feature_report
from dwcp.errors import (AdmissionDenied, AuthError, CapabilityError, ConfigError, DWCPError,
                         InsufficientBandwidth, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferTimeout, TransportError)
from dwcp.transport import BufferTooSmall, Listener, Session, connect, listen

__version__ = "0.1.0"

__all__ = [
    "AdmissionDenied", "AuthError", "BufferTooSmall", "CapabilityError", "ConfigError", "DWCPError",
    "InsufficientBandwidth", "Listener", "PeerClosedError", "ProtocolError", "Session",
    "SessionClosedError", "TransferTimeout", "TransportError", "__version__", "backend",
    "backend_features", "connect", "feature_report", "listen",
]


def __getattr__(name: str) -> Any:
    # Computed on first access: probing the kernel at import time would slow every `import dwcp`.
    from dwcp import _features
    if name == "backend_features":
        return _features.backend_features()
    if name == "backend":
        return _features.backend()
    raise AttributeError(f"module 'dwcp' has no attribute {name!r}")
