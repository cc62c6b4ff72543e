"""Ingest: a batch of ClaimEvents into the ledger in one transaction (store), the bulk
statements it writes with (bulk), the producer that publishes them, dead letters, and the
bisection that isolates an event the store refuses (poison)."""
