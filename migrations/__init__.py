"""Alembic migrations of the accumsync store (run with ``accumsync db upgrade``)."""
