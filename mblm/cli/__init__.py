"""Command-line entry points: ``mblm-train``, ``mblm-generate``, ``mblm-plot``, ``mblm-export``."""
