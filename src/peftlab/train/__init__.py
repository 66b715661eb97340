"""The gradient loop and what it needs: one optimizer step, checkpoints, device and precision, saving.

It knows nothing of recipes or experiments; `peftlab.recipes.train_run` drives it.
"""
