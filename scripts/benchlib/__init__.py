"""The parts of ``scripts/bench.py`` (run it, not these modules)."""
