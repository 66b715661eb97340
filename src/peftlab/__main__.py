"""`python -m peftlab`: the same command as `peftlab`."""

from __future__ import annotations

from peftlab.cli import main

main()
