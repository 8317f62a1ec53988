"""Executors: one per job type. A job's name selects its executor."""
