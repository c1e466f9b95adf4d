"""Speed and memory benchmarks (BENCHMARKS.md): generation per method, and projection building.

Run as ``python -m bench generation ...`` or ``... building ...``; docs/performance.md has the
commands and what each number means.
"""

from bench.building import BuildingSettings, run_building
from bench.generation import GenerationSettings, run_generation

__all__ = ["BuildingSettings", "GenerationSettings", "run_building", "run_generation"]
