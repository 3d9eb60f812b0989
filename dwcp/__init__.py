"""DWCP: striped multi-stream bulk transport."""

from dwcp.errors import (AdmissionDenied, AuthError, CapabilityError, ConfigError, DWCPError,
                         InsufficientBandwidth, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferTimeout, TransportError)

__version__ = "0.1.0"

__all__ = [
    "AdmissionDenied", "AuthError", "CapabilityError", "ConfigError", "DWCPError",
    "InsufficientBandwidth", "PeerClosedError", "ProtocolError", "SessionClosedError",
    "TransferTimeout", "TransportError", "__version__",
]
