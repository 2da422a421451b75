"""The `eval` stage: held-out comparison of systems, judges, metric-human agreement, statistics."""
