"""How a base model is adapted: the method registry, the peft tuners, the rules for vision-language models,
and the linear head with its text features.

Imports the stages below it (`core`, `data`, `kernels`, `models`, `prompts`).
"""
