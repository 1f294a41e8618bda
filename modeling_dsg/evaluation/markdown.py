"""Markdown table cells and numbers, one set for every page the package writes.

`dsg eval`'s summary.md (`report.py`, `fluency.summary_lines`), the model card (`publishing/cards.py`) and
`dsg results`' README (`embedded/results.py`) format their cells here. Each page keeps the look it always
had through the parameters (what a missing number reads as, whether tiny numbers go scientific, whether a
cell is trimmed):

    md_cell       text safe in a table cell: newlines as spaces, pipes escaped (`tidy`: also "\\r", trimmed)
    md_excerpt    one line of generated text, whitespace collapsed, cut to a width with "..."
    finite_number a real, finite number as a float; None for anything else (None, NaN, inf, bool, text)
    fmt_number    integers with thousands separators, floats with `digits` decimals, scientific from 1e6
    fmt_fixed     a number with `digits` decimals, nothing else (no separators, no scientific notation)
    fmt_percent   a rate in [0, 1] as a percentage with one decimal
    fmt_delta     DSG − base with a sign
"""

from __future__ import annotations

import math

MISSING = "n/a"  # what a number that is not there reads as, unless a page says otherwise


def md_cell(text, *, tidy: bool = True) -> str:
    """Text safe inside a Markdown table cell: newlines as spaces and pipes escaped; `tidy` (the card's
    cells) also turns carriage returns into spaces and strips both ends, `tidy=False` (summary.md) does not."""
    text = str(text)
    if tidy:
        text = text.replace("\r", " ")
    text = text.replace("\n", " ").replace("|", "\\|")
    return text.strip() if tidy else text


def md_excerpt(text, width: int = 160) -> str:
    """Generated text for a table cell: every run of whitespace one space, pipes escaped, and at most `width`
    characters (a longer text is cut and ends with "...")."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def finite_number(x) -> float | None:
    """`x` as a float if it is a finite int or float (not a bool); None otherwise."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_number(x, digits: int = 3, missing: str = MISSING, *, small_sci: bool = False) -> str:
    """A number for a table: integers as is with thousands separators, floats with `digits` decimals;
    scientific notation (2 decimals) from 1e6 up (e.g. a refusing row's log-likelihood, about -3.4e38 per
    token) and, with `small_sci`, below 10**-digits except 0. `missing` for anything that is not a finite number."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    v = finite_number(x)
    if v is None:
        return missing
    if small_sci and v != 0 and abs(v) < 10**-digits or abs(v) >= 1e6:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def fmt_fixed(x, digits: int = 3, missing: str = MISSING) -> str:
    """`x` with `digits` decimals as it is (an int too: 1 -> "1.000"); `missing` for None."""
    return missing if x is None else f"{x:.{digits}f}"


def fmt_percent(x, missing: str = MISSING) -> str:
    """A rate in [0, 1] as a percentage with one decimal: 0.25 -> "25.0%"; `missing` if not a finite number."""
    v = finite_number(x)
    return missing if v is None else f"{100 * v:.1f}%"


def fmt_delta(base, dsg, missing: str = MISSING) -> str:
    """DSG − base with its sign and 3 decimals (scientific from 1e6 up); `missing` unless both are finite numbers."""
    b, d = finite_number(base), finite_number(dsg)
    if b is None or d is None:
        return missing
    return f"{d - b:+.2e}" if abs(d - b) >= 1e6 else f"{d - b:+.3f}"
