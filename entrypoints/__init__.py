"""Thin MLflow Projects entry points; each calls the ldmflow click command of the same name."""
