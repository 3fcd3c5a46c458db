"""Every failure a user can cause has a type here, and every type knows its exit code.

Exit codes: 0 ok, 1 internal error (anything not listed here), 2 bad input, 3 verification failed, 4 a regression
gate failed (`compress gate`), 5 the output could not be written (disk full, read-only).
"""


class CompressError(Exception):
    """Base of all errors `compress` raises on purpose. The message is one line a user can act on."""

    exit_code = 1


class BadInput(CompressError):
    exit_code = 2


class RecipeError(BadInput):
    """A recipe, or an override of one, does not validate. The message names the field."""


class ModelLoadError(BadInput):
    """A model path, hub id or alias cannot be resolved to a model."""


class MissingPackageError(ModelLoadError):
    """An embedded model alias whose package is not installed."""


class OfflineError(ModelLoadError):
    """A hub id was asked for but no hub can be reached."""


class DataError(BadInput):
    """A data file is missing, empty, lacks a column, or its labels do not line up."""


class OutDirError(BadInput):
    """`--out` holds something that is not a `compress` run."""


class ArtifactError(BadInput):
    """A directory is not a `compress` artifact, or is missing what a step needs."""


class BackendError(BadInput):
    """A library underneath (neural-compressor, ONNX Runtime's quantizers) cannot handle this model or op; the
    message names the backend and a route that works."""


class ExportMismatch(CompressError):
    """An exported or quantized graph disagrees with its reference beyond the allowed tolerance."""

    exit_code = 3


class BenchError(CompressError):
    """A benchmark worker died, or did not answer a request in time."""

    exit_code = 1


class NothingToDo(BadInput):
    """A step's settings leave nothing for it to change (every node excluded, nothing to fuse)."""


class UsageError(BadInput):
    """A command-line flag has a value its setting does not accept. The message names the flag."""


class GateRefused(BadInput):
    """`compress gate` cannot compare the two results: unreadable, or measured on other data or machines."""


class GateFailed(CompressError):
    """`compress gate`: the candidate lost more than allowed, beyond what noise explains."""

    exit_code = 4


class WriteError(CompressError):
    """The output directory stopped taking writes: full, read-only, no permission. Finished stages stay whole."""

    exit_code = 5
