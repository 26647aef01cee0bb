"""Token usage: the per-request record, normalising each provider's usage dialect, and cost."""
