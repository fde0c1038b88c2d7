"""Evaluation of committed checkpoints."""
