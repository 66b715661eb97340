"""peftlab: adapt a small pretrained language model to a task, and know which method works best.

The flow, one module per stage: config -> tasks (data) -> models -> methods -> train -> evaluate -> report.
"""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then warns on every start that
# an optional Hub kernel (which cannot be downloaded here anyway) is missing; its fallback kernel works.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
