"""Names of the per-sample engine's options."""

from __future__ import annotations

from typing import Literal

Method = Literal["auto", "vmap", "loop"]
Randomness = Literal["error", "same", "different"]
