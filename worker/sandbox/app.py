"""The sandbox as an ASGI app, and a blocking ``serve`` for the CLI."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette

from worker.sandbox.admin import admin_routes
from worker.sandbox.config import SandboxConfig
from worker.sandbox.emulator import Sandbox
from worker.sandbox.routes import vba_routes


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """A Starlette app emulating VBA's accumulator endpoints; ``app.state.sandbox`` is its state."""
    sandbox = Sandbox(config or SandboxConfig())
    app = Starlette(routes=[*vba_routes(sandbox), *admin_routes(sandbox)])
    app.state.sandbox = sandbox
    return app


def serve(host: str = "127.0.0.1", port: int = 8700, config: SandboxConfig | None = None) -> None:
    """Serve the sandbox until interrupted."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
