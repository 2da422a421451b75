"""Shared plumbing every stage uses: errors, the record format, JSONL streams, files, models."""
