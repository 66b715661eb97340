"""Examples and where they come from: the task registry, data files, splits, teacher targets, mixtures,
and the pure metric functions each task scores with.

Imports only `core`: reading data never depends on the model or the method.
"""
