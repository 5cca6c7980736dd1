"""Errors a user can act on: each message says what was wrong and how to fix it."""


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
