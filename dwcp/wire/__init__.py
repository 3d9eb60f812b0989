"""Wire format: frames, handshake, negotiation and authentication (docs/protocol.md)."""
