"""Decision: one choice the control plane made, with its reason and the inputs it saw.

Every policy choice (tier, transport mode, stream count, compression level, plain fallback) is one of
these: logged, kept in the Manager's history for ``stats()``, counted in metrics and shown by the CLI.
A decision carries the inputs as plain values, so a log line or a JSON dump says why without a debugger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Decision:
    what: str                    # "tier", "mode", "streams", "compression_level", "channel", ...
    value: Any                   # the choice (an int, a str, None for "off")
    reason: str                  # one sentence a user can read
    peer: str = ""               # the peer it applies to ("" for process-wide)
    at_s: float = 0.0            # the Manager's clock when it was made
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        value = self.value.value if hasattr(self.value, "value") else self.value
        return {"what": self.what, "value": value, "reason": self.reason, "peer": self.peer,
                "at_s": round(self.at_s, 6), "inputs": {k: _plain(v) for k, v in self.inputs.items()}}

    def __str__(self) -> str:
        peer = f" for {self.peer}" if self.peer else ""
        return f"{self.what}{peer} = {_plain(self.value)}: {self.reason}"


def _plain(v: Any) -> Any:
    if hasattr(v, "value") and not isinstance(v, (int, float, str)):
        return v.value
    if isinstance(v, float):
        return round(v, 6)
    return v
