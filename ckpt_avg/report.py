"""What the user sees: the plan table, the one-line summary and the JSON report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate checkpoint as the plan shows it."""

    path: str
    epoch: int | None
    step: int | None
    index: int | None
    size: int
    selected: bool
    reason: str = ""
    weight: float | None = None
    tensor_digest: str | None = None
    legacy: bool = False


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str | None


@dataclass
class Report:
    """Everything one run decided and did; `--json` prints it, the API returns it."""

    version: str
    by: str
    candidates: list[CandidateRecord]
    dry_run: bool = False
    order: str = ""  # how the checkpoints are ordered, in words (select.describe_order)
    state_dict_key: str | None = None
    other_state_dicts: list[str] = field(default_factory=list)
    output: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    output_digest: str | None = None  # checkpoint digest of the output's tensors, in `digest_scheme`
    digest_scheme: str | None = None
    parameters: int = 0
    tensors: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def selected(self) -> list[CandidateRecord]:
        return [c for c in self.candidates if c.selected]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [asdict(c) for c in self.selected]
        data["skipped"] = [{"path": c.path, "reason": c.reason} for c in self.candidates if not c.selected]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def terminal_safe(text: object, *, newlines: bool = False) -> str:
    r"""`text` with every character that a terminal would act on or not show written as an escape.

    File names, keys, global names and metric names come from files and paths that someone
    else may have made: raw, an escape sequence in them can erase a warning line, move the
    cursor or retitle the window. Control characters (C0, DEL, C1), format characters
    (bidirectional overrides, zero-width marks), line and paragraph separators, private-use,
    unassigned and surrogate code points (undecodable bytes of a file name) are escaped;
    a newline is kept only where `newlines` is true (a table made of escaped cells).

    >>> terminal_safe("epoch=1\x1b[2K\r.pt")
    'epoch=1\\x1b[2K\\r.pt'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(char, newlines) for char in text)


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str, newlines: bool) -> str:
    if char == "\n" and newlines:
        return char
    if char.isprintable():
        return char
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def plan_table(report: Report) -> str:
    """Every candidate with its index, size and whether it is selected (or why not)."""
    numbered = report.by in ("order", "save")
    header = ("", "save" if report.by == "save" else "#" if numbered else "", "epoch", "step", "size", "file", "")
    rows = [header]
    for c in report.candidates:
        mark = "*" if c.selected else "-"
        note = ""
        if c.selected and c.weight is not None:
            note = f"weight {c.weight:.6g}"
        elif not c.selected:
            note = c.reason
        if c.legacy:
            note = (note + "; " if note else "") + "legacy (pre-zip) format"
        number = _text(c.index) if numbered else ""
        path, note = terminal_safe(c.path), terminal_safe(note)
        rows.append((mark, number, _text(c.epoch), _text(c.step), human_size(c.size), path, note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=False) if width) + "  " + r[-1]
        for r in rows
    ]
    lines = [line.rstrip() for line in lines]
    chosen = len(report.selected)
    order = report.order or f"ordered by {report.by}"
    lines.append(f"{chosen} of {len(report.candidates)} checkpoint(s) selected, {order}")
    if report.state_dict_key is not None:
        others = f"; also found: {', '.join(report.other_state_dicts)}" if report.other_state_dicts else ""
        lines.append(terminal_safe(f"state dict: {report.state_dict_key}{others}"))
    return "\n".join(lines)


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def summary_line(report: Report) -> str:
    chosen = report.selected
    indices = [c.index for c in chosen if c.index is not None]
    if indices and report.by != "order":
        span = f"{report.by} {min(indices)}-{max(indices)}"
    else:  # no index: the same words as the plan's (given order, or natural order of the names)
        span = report.order.removesuffix(" (no epoch or step)") or "as given"
    return (
        f"Averaged {len(chosen)} checkpoint(s) ({span}) into {terminal_safe(report.output)}: "
        f"{report.parameters:,} parameters in {report.tensors} tensors, {report.seconds:.1f}s"
    )
