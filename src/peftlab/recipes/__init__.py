"""The commands' workflows, built from the stages below: train (one path for single tasks and mixtures),
eval, compare, cv, sweep and probe. Nothing in the library imports a recipe.
"""
