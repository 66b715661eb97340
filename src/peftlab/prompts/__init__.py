"""From examples to token ids: the prompt format a model gets, encoding and truncation, few-shot demos,
class weights, token-budget batches and collation, and the image slots of vision prompts.

Imports `core`, `data` and `models`.
"""
