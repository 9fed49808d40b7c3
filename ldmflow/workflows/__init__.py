"""The stages as a user runs them: train, sample and the pipeline, joining the trainers to MLflow tracking."""
