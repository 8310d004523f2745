"""The one spelling of each dtype and init scheme, and the old spellings still accepted for one release.

Every command spells dtypes as RWKV-LM does (fp32, bf16, fp16) and init schemes as `rwkvctl init`/`train` do
(v5.2-2023, rwkv-lm-2024). Older spellings that some command used to take (`kernels check --dtype float32`,
`add-gate --init rwkv-lm`) still work until the next release: lower layers translate them silently through
`canonical`, and the CLI prints the one-line notice `Spelling.notice` gives. stdlib only: the ground floor.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("fp32", "bf16", "fp16")
INIT_SCHEMES = ("v5.2-2023", "rwkv-lm-2024")

# kind -> {old spelling: the one spelling}; remove an entry one release after it was deprecated
DEPRECATED: dict[str, dict[str, str]] = {
    "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"},
    "init": {"rwkv-lm": "rwkv-lm-2024"},
}


@dataclass(frozen=True)
class Spelling:
    name: str
    """The one spelling (or the value as given when it is no known old spelling: the caller validates it)."""
    old: str | None = None
    """The deprecated spelling the caller gave, if it gave one."""

    def notice(self, flag: str) -> str | None:
        """The one-line deprecation notice for a CLI option, or None when the current spelling was used."""
        if self.old is None:
            return None
        return f"{flag} {self.old} is deprecated and will stop working in the next release; use {flag} {self.name}"


def canonical(kind: str, value: str) -> Spelling:
    """The one spelling of `value` (a "dtype" or an "init" scheme), noting an old spelling it replaced."""
    new = DEPRECATED[kind].get(value)
    return Spelling(value) if new is None else Spelling(new, value)


def dtype_name(torch_name: str) -> str:
    """The short name of a torch dtype's name ("bfloat16" or "torch.bfloat16" -> "bf16"); others unchanged."""
    bare = torch_name.removeprefix("torch.")
    return DEPRECATED["dtype"].get(bare, bare)
