"""Writing and printing evaluation results."""
from __future__ import annotations

import json
import os
import pathlib


def write_results(path: str | os.PathLike, results: dict) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def group(results: dict, prefixes) -> dict:
    """{prefix: {key without prefix: value}} for the flat ``prefix/key`` results."""
    out = {}
    for prefix in prefixes:
        part = {k[len(prefix) + 1:]: v for k, v in results.items() if k.startswith(prefix + "/")}
        if part:
            out[prefix] = part
    return out
