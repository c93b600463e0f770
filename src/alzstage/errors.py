"""Errors whose message is written for a person (what, where, how to fix).

Every error alzstage raises on purpose is an :class:`AlzstageError`, so the CLI catches
that one class, prints the message on one line and exits non-zero, with no traceback;
anything else is a bug and keeps its traceback. The subclasses say whose mistake it is:

* :class:`ConfigError`: ``params.yaml``;
* :class:`DataError`: the data on disk or at the source (download, unsafe archive,
  validation, split leakage, a stage input that is not there yet or lacks a key);
* :class:`InputError`: a file handed to ``predict`` or ``serve``;
* :class:`ModelError`: a model that cannot be found, loaded or registered.
* :class:`ComputeError`: the Dask cluster of ``compute`` (unreachable, lost).
* :class:`TrackingStoreError`: the MLflow store file (empty, truncated, damaged).

Several also derive from the builtin they replaced (``ValueError``, ``RuntimeError``,
``FileNotFoundError``), so code that caught the builtin keeps working. The older names
stay importable from their modules (``alzstage.data.validate.ValidationFailed`` ...).

This module imports nothing, so the CLI can catch these without loading TensorFlow just
to know the exception type.
"""


class AlzstageError(Exception):
    """Base of every error whose message is written for a person."""


class ConfigError(AlzstageError, ValueError):
    """A params.yaml problem, phrased for a person: the key, the value, how to fix it."""


# --------------------------------------------------------------------------- data


class DataError(AlzstageError, ValueError):
    """The data cannot be used as it is; the message names the file and the fix."""


class MissingInputError(DataError, FileNotFoundError):
    """A file a stage reads is not there yet; the message names the stage to run first."""


class DownloadError(DataError, RuntimeError):
    """A source could not be fetched or unpacked; the message says which and how to fix it."""


class UnsafeArchiveError(DownloadError):
    """An archive entry that would escape, link, overwrite or explode on extraction."""


class ValidationError(DataError, RuntimeError):
    """The raw data broke a validation rule; the message lists files and how to fix them."""


class SplitLeakageError(DataError, RuntimeError):
    """A subject-level split put one subject in two splits (a bug, never a data issue)."""


class ArtifactError(DataError):
    """A file one stage wrote for another lacks a key or has a wrong value (alzstage.artifacts)."""


class SubjectsCsvError(DataError):
    """The subjects CSV itself is unusable (missing columns, unknown labels, duplicates)."""


# --------------------------------------------------------------------------- inputs


class InputError(AlzstageError, ValueError):
    """A file or value given to a command (``predict``, ``serve``, ``promote``) is unusable."""


class ImageReadError(InputError):
    """An input file is not a readable image; the message names it."""


# --------------------------------------------------------------------------- models


class ModelError(AlzstageError, RuntimeError):
    """A model that cannot be found, loaded or registered as asked."""


class ModelNotFound(ModelError):
    """No model behind the reference; the message says how to create one."""


class WeightsError(ModelError):
    """``model.weights`` could not be honoured; never silently replaced by random weights."""


class DatasetUnknown(DataError):
    """The configured dataset, and so its champion, cannot be named until the pipeline ran."""


# --------------------------------------------------------------------------- compute


class ComputeError(AlzstageError, RuntimeError):
    """The Dask cluster (``compute``) cannot be started or reached, or was lost mid-run."""


# --------------------------------------------------------------------------- tracking


class TrackingStoreError(AlzstageError, RuntimeError):
    """The MLflow store (``mlflow.db``) is damaged; the message names it and how to recover."""
