"""Scoring a model on a split: label-word likelihoods (and their calibration), validation loss, batched
generation and the fast greedy decoder, and the task metrics over them.
"""
