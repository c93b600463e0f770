"""Every exception alzstage raises on purpose, each written for a person (what, where, fix).

Why one module and few classes: a class exists only where some caller tells it apart,
by catching it by name or by turning it into its own HTTP status or exit code. Anything
else is an :class:`AlzstageError` with a good message; the message, not the type, is
what the person reads. Each class below says who catches it.

* :class:`AlzstageError`: the CLI prints it on one line and exits 1, no traceback;
  anything else is a bug and keeps its traceback.
* :class:`ConfigError`: ``params.yaml`` is wrong (the CLI exits 2 before any work).
* :class:`InputError`: a file or value handed to ``predict``/``serve`` (exit 2, HTTP 400);
  :class:`ImageReadError` and its subclasses are one unusable input file, reported on
  its own row while the rest of the batch goes on, with an HTTP status per class.
* :class:`SubjectsCsvError`, :class:`ModelNotFound`: caught to add context or a hint.

Several also derive from the builtin they replaced (``ValueError``, ``RuntimeError``).

This module imports nothing, so the CLI can catch these without loading TensorFlow just
to know the exception type.
"""


class AlzstageError(Exception):
    """Base of every error whose message is written for a person.

    Caught by the CLI (``alzstage.cli``), which prints the message on one line and exits
    1; raised as such wherever no caller needs to tell the case apart (missing stage
    input, download, validation, a model that cannot be loaded, the Dask cluster ...).
    """


class ConfigError(AlzstageError, ValueError):
    """A params.yaml problem, phrased for a person: the key, the value, how to fix it.

    Caught by the CLI's params loading (``cli._load``), which exits 2 before any work.
    """


class SubjectsCsvError(AlzstageError, ValueError):
    """The subjects CSV itself is unusable (missing columns, unknown labels, duplicates).

    Caught by the NIfTI source (``data.sources.nifti``), which names the CSV's path.
    """


class ModelNotFound(AlzstageError, RuntimeError):
    """No model behind the reference; the message says how to create one.

    Caught by ``predict`` (``inference.predict``, ``.command``, ``.batch``), which adds
    the hint to run the pipeline or name another model.
    """


# --------------------------------------------------------------------------- inputs


class InputError(AlzstageError, ValueError):
    """A file or value given to a command (``predict``, ``serve``, ``promote``) is unusable.

    Caught by ``alzstage predict`` (exit 2, a user's mistake, not a failed run) and by the
    pyfunc (``tracking``), which answers MLflow's HTTP 400 rather than a 500.
    """


class ImageReadError(InputError):
    """An input file is not a readable image; the message names it (HTTP 422).

    Caught per file by ``predict`` (an error row), the REST API (``serve.batch``, that
    file's ``status``), the decode stage (``data.pixels``) and the volume path; the rest
    of the batch goes on. ``status`` is the file's HTTP status in the REST answer.
    """

    status = 422


class UnsupportedImage(ImageReadError):
    """Not a JPEG or PNG at all (HTTP 415, the status the REST API gives the file)."""

    status = 415


class RequestTooLarge(ImageReadError):
    """Past a size cap (HTTP 413): one uploaded file, or the pixels of a whole request.

    The REST API (``serve.batch``) answers that file with 413; the rest still runs.
    """

    status = 413


class VolumeError(ImageReadError):
    """A NIfTI volume that cannot be turned into slices (HTTP 422).

    Caught by the volume cache (``data.sources.volume_cache``), which records ``check``,
    the short reason code of the QC table and the quarantine lists (``not_3d``,
    ``nonfinite``, ``voxel_size``, ``empty_brain_mask``, ``registration`` ...), and as an
    :class:`ImageReadError` everywhere a file may fail alone.
    """

    status = 422
    check = "volume_error"

    def __init__(self, message: str, check: str | None = None) -> None:
        super().__init__(message)
        if check is not None:
            self.check = check


class UnsupportedVolume(VolumeError):
    """Not a NIfTI-1/NIfTI-2 file at all (HTTP 415, the file's status in the REST API)."""

    status = 415
    check = "unreadable"


class VolumeTooLarge(VolumeError):
    """Decompresses to more than the configured limit (a gzip bomb, or a 4D series).

    HTTP 413; caught by the volume cache, which records it without writing an entry
    (the header decides it in milliseconds).
    """

    status = 413
    check = "too_large"
