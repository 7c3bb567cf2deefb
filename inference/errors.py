"""Errors the engine raises on purpose.

Every error a user can cause or fix carries a message that says what is wrong and what to
do; callers (CLI, server) print `str(error)` as is. Anything else escaping the engine is a
bug.
"""


class MultiplaneError(Exception):
    """Base class for expected, user-facing engine errors."""


class InvalidRequest(MultiplaneError, ValueError):
    """A generation request breaks a documented limit (size, steps, prompt, layer count...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class MissingWeights(MultiplaneError):
    """Required model files are not on disk and cannot be downloaded."""

    def __init__(self, missing: list[str], hint: str):
        lines = "\n".join(f"  - {m}" for m in missing)
        super().__init__(f"missing model files:\n{lines}\n{hint}")
        self.missing = list(missing)
        self.hint = hint


class UnsafeCheckpoint(MultiplaneError):
    """A pickle-based checkpoint (.ckpt/.pt/.bin/.pth) was offered; we only load safetensors."""


class WeightMismatch(MultiplaneError):
    """A state dict does not have exactly the expected tensor names and shapes."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(sorted(missing)[:10])
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(sorted(unexpected)[:10])
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        if mismatched:
            shown = sorted(mismatched)[:10]
            parts.append("wrong shape: " + ", ".join(f"{n} {tuple(g)} (expected {tuple(e)})"
                                                     for n, g, e in shown)
                         + (f" (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else ""))
        super().__init__(f"{what} does not match the expected layout; " + "; ".join(parts))
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class StackFormatError(MultiplaneError):
    """A layer-stack folder on disk is malformed; the message names the file and field."""


class Cancelled(MultiplaneError):
    """The job was cancelled cooperatively; nothing was written."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)
