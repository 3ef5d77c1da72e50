"""Dagster wiring around `dlm_pipeline.core`: assets, checks, resources and IO."""
