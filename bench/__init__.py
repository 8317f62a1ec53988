"""Benchmarks of the worker on the local Redis and Postgres; bench/README.md has the figures."""
