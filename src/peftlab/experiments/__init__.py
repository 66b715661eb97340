"""Experiments a recipe runs around a trained model: forgetting, brittleness, teacher outputs for
distillation. Independent of `train`: they take a model, never a training loop.
"""
