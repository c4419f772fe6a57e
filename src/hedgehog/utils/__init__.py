"""Leaves every layer may use: atomic file/dir writes, the cache directory, process-level CPU tuning."""
