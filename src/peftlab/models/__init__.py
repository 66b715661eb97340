"""Base models and what runs them: packaged GGUF weights, local folders, vision-language loading, quantized
bases, saved adapters, and the forward helpers (target logits and loss, the unmasked right-padded layout).

Imports `core` and `kernels`.
"""
