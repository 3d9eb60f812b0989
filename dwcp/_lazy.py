"""Package attributes that load on first use (PEP 562 ``__getattr__``), so importing a package does not
import everything it re-exports: `import dwcp` stays fast for `dwcp hde`, and a session does not pull
in the link monitor and pyroute2 when all it needs is TCP_INFO."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_attr(namespace: dict[str, Any], package: str, lazy: Mapping[str, str], name: str) -> Any:
    """Attribute `name` of `package`: imported from module ``lazy[name]`` and cached in the package's
    namespace (its ``globals()``). Any other name is an AttributeError -- which is also what
    ``from package import submodule`` must see, so this never imports on that path."""
    if name not in lazy:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(lazy[name]), name)
    namespace[name] = value
    return value
