"""What reaches the terminal: text from files, from the model and from the user's data is shown, never obeyed.

A terminal acts on control characters. ESC (a C0 control) and CSI (U+009B, a C1 control that many terminals take
as ESC [) start sequences that clear the screen, move the cursor, set the window title or plant hyperlinks; bidi
overrides and isolates reorder what is displayed, so a tensor or file name can show as something it is not.
`clean` swaps them for visible stand-ins and leaves every other character (accents, CJK, emoji) alone; `shown` also
escapes Rich markup, for a value placed inside a markup string. The consoles in `cli/_common.py` pass every
rendered segment through `clean_segments`, so a print site that forgot is still safe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from rich.markup import escape
from rich.segment import Segment

# C0 controls and DEL become their Unicode control pictures (ESC -> U+241B); newline and tab keep their meaning.
# C1 controls and the bidi overrides/isolates have no pictures: they are spelled out as <U+XXXX>.
# Bidi marks (U+200E/F, U+061C) stay: real right-to-left text needs them and they cannot override a run.
_C0 = [c for c in range(0x20) if c not in (0x09, 0x0A)]
_C1 = range(0x80, 0xA0)
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]  # LRE RLE PDF LRO RLO, LRI RLI FSI PDI
STAND_INS: dict[int, str] = (
    {c: chr(0x2400 + c) for c in _C0} | {0x7F: "\u2421"} | {c: f"<U+{c:04X}>" for c in (*_C1, *_BIDI)}
)
_UNSAFE = re.compile("[" + "".join(re.escape(chr(c)) for c in STAND_INS) + "]")


def clean(text: str) -> str:
    """`text` with every control character except newline and tab, and every bidi override, made visible."""
    return text.translate(STAND_INS) if _UNSAFE.search(text) else text


def shown(value: object) -> str:
    """A value for a Rich markup string: cleaned first, then markup-escaped (so `[x]` prints as `[x]`)."""
    return escape(clean(str(value)))


def one_line(text: str) -> str:
    """Cleaned and on one line: newlines and tabs (which `clean` keeps) become single spaces."""
    return re.sub(r"[ \t]*[\t\n][ \t\n]*", " ", clean(text)).strip()


def clean_segments(segments: Iterable[Segment]) -> Iterator[Segment]:
    """Rendered segments with their text cleaned; control segments (Rich's own cursor moves) pass as they are."""
    for segment in segments:
        text, style, control = segment
        if control or not _UNSAFE.search(text):
            yield segment
        else:
            yield Segment(clean(text), style, control)
