"""Errors that tensorpar reports to users as one clear line (no traceback wall)."""


class TensorparError(Exception):
    """Base class: the CLI prints ``tensorpar: error: <message>`` and exits non-zero."""


class CheckpointError(TensorparError):
    """A checkpoint is missing, truncated, or does not match the model it claims to be."""


class RankFailure(TensorparError):
    """A rank of the tensor-parallel group died or raised; the others were stopped."""

    def __init__(self, rank: int, world_size: int, reason: str, place: str = ""):
        self.rank, self.world_size, self.reason, self.place = rank, world_size, reason, place
        where = f" ({place})" if place else ""
        super().__init__(f"rank {rank} of {world_size}{where} failed: {reason}")

    def __reduce__(self):  # (it crosses process boundaries: a rank reports a peer that fell silent)
        return type(self), (self.rank, self.world_size, self.reason, self.place), self.__dict__

    def placed(self, describe) -> "RankFailure":
        """The same failure, naming the rank's place in the layout (``describe(rank)``)."""
        out = type(self)(self.rank, self.world_size, self.reason, describe(self.rank))
        out.remote_traceback = getattr(self, "remote_traceback", None)
        return out


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."
