"""Model quality, computed without MLflow: image metrics, FID/KID on chosen features, condition adherence."""
