"""The speed internals: the last layer run only where logits are wanted, the lean SwiGLU and fused RMSNorm,
the shared prompt prefix, and the decode KV cache with its attention.

Each rewrites part of a transformers model in place and imports only torch and transformers.
"""
