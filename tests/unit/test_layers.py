"""The layers hold at run time too: importing the VBA client, the sandbox or the CLI has no side
effect (no Celery app, no settings read, no directory made) until a command needs one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
import worker.vba, worker.sandbox, worker.cli
from worker.settings import get_settings
print(get_settings.cache_info().currsize, "celery" in sys.modules, "worker.celery" in sys.modules)
"""


def test_importing_the_client_the_sandbox_or_the_cli_starts_nothing(tmp_path: Path) -> None:
    """Before, `import worker` built the Celery app, read every setting, made ~/.accumsync and
    configured logging; now nothing happens until a command asks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.split() == ["0", "False", "False"]
    assert not (tmp_path / ".accumsync").exists()
