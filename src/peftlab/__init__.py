"""peftlab: adapt a small pretrained language model to a task, and know which method works best.

The flow, one module per stage: config -> tasks (data) -> models -> methods -> train -> evaluate -> report.
"""

__version__ = "0.1.0"
