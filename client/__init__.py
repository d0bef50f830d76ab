"""The client shell: `HelixClient` generates with a swarm (routing, sessions, failover), `helix
generate` on the command line. Installed as `helix_p2p.client`.

Names load on first use, so that registering `helix generate` (which imports `helix_p2p.client.cli`)
does not import torch and hivemind."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ClientOptions": "client",
    "GenerationResult": "client",
    "HelixClient": "client",
    "Timings": "client",
    "Token": "client",
    "BadRequestError": "errors",
    "ClientError": "errors",
    "GenerationFailedError": "errors",
    "NoRouteError": "errors",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
