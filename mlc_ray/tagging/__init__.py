"""Bulk tagging: Ray Data pipeline, inference backends and the Parquet tag table."""
