"""The VBA client: ``VbaClient``, its results and the errors it raises (see errors.py's tree)."""

from worker.vba.client import USER_AGENT, VERSION, VbaClient
from worker.vba.errors import RETRYABLE, VbaAuthError, VbaError, VbaRejected, VbaUnavailable
from worker.vba.results import BatchItem, BatchResult, Page

__all__ = [
    "RETRYABLE",
    "USER_AGENT",
    "VERSION",
    "BatchItem",
    "BatchResult",
    "Page",
    "VbaAuthError",
    "VbaClient",
    "VbaError",
    "VbaRejected",
    "VbaUnavailable",
]
