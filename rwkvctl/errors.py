"""Typed errors raised by every layer below the CLI.

Lower layers never print or exit: they raise one of these with a one-line message that names the
file/key/line at fault and what to do. The CLI turns them into a red line and an exit code.
"""

from __future__ import annotations


class RwkvctlError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 2


class ConfigError(RwkvctlError):
    """A model/run config is invalid (bad value, unknown preset, inconsistent sizes)."""


class CheckpointError(RwkvctlError):
    """A checkpoint file is unreadable, foreign, truncated or does not match its config."""


class DataError(RwkvctlError):
    """A data file (binidx, manifest, corpus) is missing or malformed."""


class TokenizerError(RwkvctlError):
    """A tokenizer file is missing or malformed, or a token id is out of range."""


class KernelUnavailable(RwkvctlError):  # noqa: N818 (public name used across the package)
    """The compiled extension cannot be built or loaded on this machine."""


class TrainingError(RwkvctlError):
    """Training cannot continue (NaN loss, unwritable run dir, data too small, ...)."""


class BuildLockTimeout(RwkvctlError):  # noqa: N818 (says what happened, like KernelUnavailable)
    """Another live process has held the build lock of a compiled part for too long."""


class DirectoryInUse(RwkvctlError):  # noqa: N818 (says what happened, like BuildLockTimeout)
    """Another live rwkvctl command is writing the same output directory (or file) right now."""


class NumericsError(RwkvctlError):
    """The model produced non-finite numbers at run time (NaN/Inf logits): the reply or step cannot go on."""

    exit_code = 1
