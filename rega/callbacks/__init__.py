"""Thin callbacks that schedule work done by plain functions elsewhere (evaluation: :mod:`rega.eval.runner`)."""

from rega.callbacks.evaluation import EvaluationCallback

__all__ = ["EvaluationCallback"]
