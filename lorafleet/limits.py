"""Bounds that training and serving must agree on, in one place: what a fleet may train is what
the endpoint can serve (`lorafleet validate` refuses a job the serving engine would refuse)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Strict

# The gathered engine's default rank bound (its banks grow to the largest rank loaded, up to this).
MAX_SERVE_RANK = 64

# Registered model names are '<prefix><customer>'; the endpoint parses 'name@alias' and 'name/N',
# so neither part may contain '@' or '/'. Letters, digits, '.', '_' and '-', starting alphanumeric.
NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._-]*"
PREFIX_RULE = r"([A-Za-z0-9][A-Za-z0-9._-]*)?"  # empty = no prefix


def check_name(kind: str, value: str, rule: str = NAME_RULE) -> str:
    """Return value, or raise ValueError saying which characters are allowed."""
    if not re.fullmatch(rule, value):
        raise ValueError(
            f"{kind} {value!r} may use only letters, digits, '.', '_' and '-', starting with "
            "a letter or digit ('@' and '/' are taken by the name@alias and name/version forms)"
        )
    return value


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


# Numbers in the files people write (fleet files, serve configs, keys files): YAML and JSON give
# ints, floats and booleans their own types, so a setting takes each only as itself (`rank: true`
# is a mistake, not rank 1). Numbers written as strings ('1e-4', which YAML 1.1 reads as a
# string) still parse as floats; the models also set allow_inf_nan=False.
Whole = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Real = Annotated[float, BeforeValidator(_not_a_bool)]
