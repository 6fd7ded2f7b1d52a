"""User-facing errors.

Every error a user can cause with bad input (a spec, a weights file, a dataset, a config key)
is an ``OhemError``: the CLI prints its message alone, without a traceback, and exits non-zero.
The message must name the file, line, layer, blob, param or module at fault.
"""


class OhemError(Exception):
    """Base of all errors caused by bad input; the message is shown to the user as is."""


class SpecError(OhemError):
    """A network or solver spec that cannot be parsed or built (names file/line/layer/blob)."""


class WeightsError(OhemError):
    """A .caffemodel that is corrupt or does not match the net (names file/layer/blob)."""


class ConfigError(OhemError):
    """An unknown config key or a value of the wrong type (names the key and the source)."""


class DataError(OhemError):
    """A dataset, annotation, image or proposals file that cannot be used (names the file)."""
