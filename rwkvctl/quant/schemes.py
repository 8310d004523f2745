"""The scheme registry: each way of storing a weight in fewer bits registers encode / decode / matmul under a name.

A scheme turns a 2-D float weight (out, in) into a few stored tensors (its `tensor_names`, saved in the file as
`<weight>.<tensor name>`) plus JSON-able parameters, and back; `matmul` computes x @ W.T for a block of output rows
straight from the stored form (what QuantLinear runs). The file records each weight's scheme name and parameters
(rwkvctl.quant.format), so a file written with any registered scheme loads without being told how it was made.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkvctl.errors import ConfigError

Params = dict[str, Any]  # a scheme's parameters as recorded in the file: JSON values only

# Modules whose import registers the schemes that ship with rwkvctl.
BUILTIN_SCHEME_MODULES = ("rwkvctl.quant.groupwise",)


@dataclass(frozen=True)
class Encoded:
    """One weight as a scheme stores it."""

    stored: dict[str, Tensor]  # by the scheme's tensor names
    params: Params  # what decoding needs (the file records these), resolved for this weight
    rel_error: float  # ||decode(encode(w)) - w|| / ||w||


class Scheme(ABC):
    """A quantization scheme. Subclasses set `name` and `tensor_names` and register an instance."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def encode(self, w: Tensor, **options: Any) -> Encoded:
        """A 2-D float weight -> its stored form; `options` are the scheme's own settings (bits, group, ...).
        Raises ConfigError (without the tensor name; the caller adds it) for a weight it cannot store."""

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise ConfigError (naming the command-line option) for settings `encode` cannot use; called once per
        quantization run, before any tensor is touched. Accepts everything unless a scheme overrides it."""
        return None

    @abstractmethod
    def check(self, stored: dict[str, Tensor], params: Params, shape: tuple[int, int]) -> None:
        """Raise ValueError (a short reason) unless `params` are valid and `stored` fits a weight of `shape`."""

    @abstractmethod
    def decode(self, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        """Rows `rows` of the weight in fp32."""

    def matmul(self, x: Tensor, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        """x (n, in) @ W[rows].T -> (n, len(rows)). The default expands the rows; schemes override it with a
        path that works on the stored form."""
        return F.linear(x, self.decode(stored, params, rows).to(x.dtype))

    def describe(self, params: Params) -> str:
        """A short label for summaries (e.g. '4-bit')."""
        return self.name

    def stored_layout(
        self, shape: tuple[int, int], **options: Any
    ) -> tuple[Params, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        """(params, {tensor name: (dtype, shape)}) that `encode` gives a weight of `shape`, without a weight (for
        `quantize --estimate`). The default encodes zeros of that shape; schemes override it with arithmetic."""
        enc = self.encode(torch.zeros(shape), **options)
        return enc.params, {k: (t.dtype, tuple(t.shape)) for k, t in enc.stored.items()}


_REGISTRY: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Make `scheme` available by its name (to the writer and to every loader). Names are unique."""
    existing = _REGISTRY.get(scheme.name)
    if existing is not None and type(existing) is not type(scheme):
        raise ValueError(f"quantization scheme {scheme.name!r} is already registered by {type(existing).__name__}")
    _REGISTRY[scheme.name] = scheme
    return scheme


def unregister(name: str) -> None:
    """Remove a scheme (tests register toy schemes and take them away again)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    for module in BUILTIN_SCHEME_MODULES:
        importlib.import_module(module)  # registers on import; a no-op after the first time


def get_scheme(name: str) -> Scheme:
    """The scheme registered as `name`; KeyError for an unknown name (the caller says which file and tensor)."""
    _load_builtins()
    return _REGISTRY[name]


def scheme_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def encode_with(name: str, w: Tensor, **options: Any) -> tuple[PackedWeight, float]:
    """Quantize `w` with the scheme `name` -> (the packed weight, its relative error)."""
    try:
        scheme = get_scheme(name)
    except KeyError:
        raise ConfigError(f"unknown quantization scheme {name!r}; known: {', '.join(scheme_names())}") from None
    enc = scheme.encode(w, **options)
    rows, cols = w.shape
    return PackedWeight(scheme, enc.params, enc.stored, (rows, cols), w.dtype), enc.rel_error


@dataclass(frozen=True)
class PackedWeight:
    """One quantized weight: its scheme, the scheme's parameters and stored tensors, and what it expands to."""

    scheme: Scheme
    params: Params
    stored: dict[str, Tensor]
    shape: tuple[int, int]  # (out, in) of the original weight
    dtype: torch.dtype  # of the original weight

    def expand(self, rows: slice = slice(None)) -> Tensor:
        """The weight (or some of its rows) in fp32."""
        return self.scheme.decode(self.stored, self.params, rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())
