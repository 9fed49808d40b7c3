"""MLflow tracking for ldmflow: the store, a run tracker for training loops, model registration and lineage.

Nothing here is imported by `ldmflow --help`; each module imports mlflow inside its functions or at its own
top level, so only the commands that track pay for the MLflow import.
"""
