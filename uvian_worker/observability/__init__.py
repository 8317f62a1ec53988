"""Logs, metrics and health: what an operator sees of a running worker."""
