"""This process's VBA client, built once: the one every flush, plan push and reconcile uses."""

from __future__ import annotations

from functools import cache

from worker.settings import get_settings
from worker.store import counters
from worker.vba.client import VbaClient


@cache
def client() -> VbaClient:
    """This process's VBA client (one token and one rate-limit bucket shared by the fleet, via
    Redis or else the store), its events of note counted durably."""
    return VbaClient(get_settings(), on_event=counters.bump, in_store=True)
