"""Small file helpers shared by the dataset readers."""
from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> Any:
    """json.load with errors that name the file and what it should hold.

    A missing file raises FileNotFoundError; a file that is not JSON (or not UTF-8) raises
    ``error``, the reader's own malformed-input exception.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({what}): {e}") from None
