"""A faithful VBA emulator (seed endpoints, auth, 207, paging, rate limit, faults), offline."""

from worker.sandbox.app import create_app, serve
from worker.sandbox.config import Faults, SandboxConfig

__all__ = ["Faults", "SandboxConfig", "create_app", "serve"]
