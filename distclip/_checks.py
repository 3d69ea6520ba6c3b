"""Conversion of the numeric arguments, with errors that say what was wrong and what to pass instead."""

from typing import Any


def as_float(value: Any, name: str) -> float:
    """``float(value)``, as ``torch.nn.utils`` converts it, with a clearer error of the same type."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"`{name}` must be a real number (a float, an int, or a string such as 'inf'), "
            f"got {value!r} of type {type(value).__name__}"
        ) from err
