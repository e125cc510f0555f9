"""The export never reaches a model hub: every model comes from a local folder (the packaged MiniLM or a path)."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def ensure_offline() -> None:
    """Sets ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` to 1 unless the caller set them.

    Call it before transformers, optimum or huggingface_hub is first imported (they read the variables at import
    time): at entry points and at the top of the functions that load models. Idempotent.
    """
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
