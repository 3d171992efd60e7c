"""Where things live: the shared data folder, the package's demo data, the project's cache.

Config files name files with a scheme prefix so they stay portable:
``shared:pubmedqa/train.jsonl`` is resolved against ``$REGA_SHARED_DATA`` (default ``../shared/data`` beside the
repository), ``demo:medical.jsonl`` against the demo data shipped inside the package. Anything else is a plain path.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


def shared_data_dir() -> Path:
    return Path(os.environ.get("REGA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """Converted models and tokenized datasets; override with ``$REGA_CACHE``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rega"
    return Path(os.environ.get("REGA_CACHE", default))


def resolve_path(path: str | os.PathLike) -> Path:
    text = str(path)
    if text.startswith("shared:"):
        return shared_data_dir() / text[len("shared:") :]
    if text.startswith("demo:"):
        return DEMO_DIR / text[len("demo:") :]
    return Path(text).expanduser()
