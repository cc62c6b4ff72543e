"""The store's room: the tables' typed handles, the key columns, the questions every part asks the
store one way ("waiting for a flush"), the bulk statements, dead letters and counters.

``ingest``, ``flush`` and ``ops`` build on it; it builds only on ``models`` and ``worker.db``.
"""
