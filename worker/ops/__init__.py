"""What operators run: health, metrics, status and dead-letter reports, replay and resolve,
``flush --wait``, and the queries they share (queries)."""
