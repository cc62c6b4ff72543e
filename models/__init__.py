"""The accumsync domain: events, the bucket table, the ledger law, wire payloads, tables. No I/O."""
