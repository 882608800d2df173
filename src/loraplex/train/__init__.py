"""Per-dataset adapter training."""
from .run import RunResult, is_complete, train

__all__ = ["RunResult", "is_complete", "train"]
