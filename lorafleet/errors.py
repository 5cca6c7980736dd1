"""Errors a user can act on: each message says what was wrong and how to fix it; and the
user's error found inside Ray's wrappers (`root_cause`)."""

from __future__ import annotations

import re
import traceback


class LorafleetError(Exception):
    """Base of every error lorafleet reports to a user (the CLI prints it without a traceback)."""


class SpecError(LorafleetError):
    """A fleet file that does not validate."""


class DataError(LorafleetError):
    """A dataset that cannot be trained on; the message names file and line."""


class RegistryError(LorafleetError):
    """An unknown adapter, alias or version, or a registry that cannot be reached."""


class BaseMismatchError(LorafleetError):
    """An adapter asked to run on a base other than the one it was trained on."""


class ChecksumError(LorafleetError):
    """A downloaded adapter file whose sha256 differs from the one recorded at registration."""


class RegistryUnavailableError(RegistryError):
    """The registry (MLflow) did not answer in time: retry later; nothing about the name is wrong."""


_SNIPPET_HEADER = re.compile(r"^\[Rank \d+ Error Snippet\]:$")


def root_cause(exc: BaseException) -> str:
    """The user's error inside Ray's wrappers: its last line is what went wrong. A worker that
    died says so in a line naming no error ("The actor is dead because ..."): that line then."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _SNIPPET_HEADER.match(ln.strip())]
    died = [ln for ln in lines if "is dead because" in ln or "died unexpectedly" in ln]
    causes = [ln for ln in lines if "Error" in ln or "Exception" in ln or "Fault" in ln]
    # not Ray's wrappers' own lines ("...WorkerGroupError: Training failed due to worker errors:")
    wrapper = ("ray.train.", "ray.exceptions.")
    errors = [ln for ln in causes if not ln.endswith(":") and not ln.startswith(wrapper)]
    pick = (errors or died or causes or lines or [type(exc).__name__])[-1]
    return pick[:2000]
