"""HDE, hybrid delta encoding: send only what changed against the version the peer already holds."""
