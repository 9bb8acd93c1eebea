"""The two things every config section is built from: its error and its field helper.

Each part declares its own section beside the code it configures (actors/config.py,
rewards/config.py, learner/config.py); cluster/config.py composes them into one tree, loads
YAML and dotted overrides, checks every field's range once and the rules that span sections.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def option(default: Any, *, choices: tuple | None = None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A config field with its valid set (`choices`) or range (`lo`..`hi`; `lo_open` / `hi_open`
    exclude the bound), which the loader checks (cluster/config.py)."""
    return field(default=default, metadata=dict(choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open))
