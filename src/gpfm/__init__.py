"""gpfm: build, distill (Unified Knowledge Distillation) and benchmark pathology foundation models."""

__version__ = "0.1.0"
