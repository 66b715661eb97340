"""The benchmarks against `transformers.Trainer` + peft and one-at-a-time generation (`peftlab bench`).

Only the CLI imports it.
"""
