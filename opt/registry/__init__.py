"""Gated registration of evaluated checkpoints in the MLflow model registry."""
