"""Shared core of the entry points: config composition and checks, MLflow tracking, tables."""
