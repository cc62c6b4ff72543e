"""A faithful VBA emulator (seed endpoints, auth, 207, paging, rate limit, faults), offline.

The server (starlette, uvicorn) is imported when first asked for: every ``accumsync`` command
mounts ``sandbox``, and only that one serves."""

from __future__ import annotations

from typing import Any

from worker.sandbox.config import Faults, SandboxConfig

__all__ = ["Faults", "SandboxConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from worker.sandbox import app

        return getattr(app, name)
    raise AttributeError(f"module 'worker.sandbox' has no attribute {name!r}")
