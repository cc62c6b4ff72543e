"""The accumsync process and its adapters: Celery app, settings, database, VBA client, sandbox, CLI.

``celery -A worker worker`` finds the Celery app here.
"""

from worker.app import app

__all__ = ["app"]
__version__ = "0.1.0"
