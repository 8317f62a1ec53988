"""Postgres: the pool, the repositories the executors use, and the migrations."""
