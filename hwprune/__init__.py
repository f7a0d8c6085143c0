"""hwprune: hardware-aware pruning search with measured latency."""
__version__ = "0.1.0"
