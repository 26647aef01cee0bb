"""The usage ledger: one SQLite row per request (written in batches) and reports over it."""
