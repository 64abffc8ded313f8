"""Retrieval quality: `python -m eval` runs a query set (or leave-one-out) through the service."""
