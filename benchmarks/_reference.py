"""Load the reference algorithm (`../shared/seed/weighted_rows.py`) for side-by-side measurements."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("DLM_REFERENCE_PATH", REPO.parent / "shared" / "seed" / "weighted_rows.py"))


def load_reference():
    if not REFERENCE.exists():
        raise SystemExit(f"reference algorithm not found at {REFERENCE}; set DLM_REFERENCE_PATH")
    spec = importlib.util.spec_from_file_location("weighted_rows_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
