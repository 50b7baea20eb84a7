"""Markdown tables and number formats shared by the report and the benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); '|' in cells is escaped, newlines become <br>."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def fmt_num(x: float | None) -> str:
    """A number as the paper writes it: 8e-4, 1e-3, 0.03, 0.1, 4096."""
    if x is None:
        return "none"
    if x == 0:
        return "0"
    if abs(x) < 0.01:
        mantissa, exponent = f"{x:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.8673 -> '86.7'; NaN -> 'n/a'."""
    return "n/a" if x != x else f"{100 * x:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value for a table: three significant figures, '<0.001' below that; none when no test was run."""
    if p is None or p != p:
        return "no test"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
