"""tensorpar: tensor parallelism for PyTorch transformer models."""

__version__ = "0.1.0"

from tensorpar.errors import CheckpointError, RankFailure, TensorparError  # noqa: E402
from tensorpar.runtime import LLM, SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "TensorparError", "CheckpointError", "RankFailure", "__version__"]
