"""The ground floor: the run config, errors, atomic file writes, the allocator setting, peak memory.

Imports nothing else of peftlab; every other stage may import it.
"""
