"""Transport: sessions over one control connection and N striped data streams."""

from dwcp.transport.connect import connect
from dwcp.transport.listener import Listener, listen
from dwcp.transport.session import BufferTooSmall, Session

__all__ = ["BufferTooSmall", "Listener", "Session", "connect", "listen"]
