"""Celery entry points: decode, call the store, map errors. Names are stable ``accumsync.*``."""
