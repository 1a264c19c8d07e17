"""Errors that tensorpar reports to users as one clear line (no traceback wall)."""


class TensorparError(Exception):
    """Base class: the CLI prints ``tensorpar: error: <message>`` and exits non-zero."""


class CheckpointError(TensorparError):
    """A checkpoint is missing, truncated, or does not match the model it claims to be."""


class RankFailure(TensorparError):
    """A rank of the tensor-parallel group died or raised; the others were stopped."""

    def __init__(self, rank: int, world_size: int, reason: str):
        self.rank, self.world_size, self.reason = rank, world_size, reason
        super().__init__(f"rank {rank} of {world_size} failed: {reason}")


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."
