"""Draw an inspect Report: rich tables for people, plain JSON for scripts. Called by cli.py only."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .inspect import Report, Section


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:,} bytes ({size:.1f} {unit})"
        size /= 1024
    return f"{n:,} bytes"


def format_value(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "bytes" and isinstance(value, int):
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "[" + ", ".join(str(v) for v in value) + "]"
        return ", ".join(format_value(v) for v in value) if value else "-"
    return str(value)


def _kv_table(section: Section) -> Table:
    table = Table(title=escape(section.title), title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for f in section.fields:
        table.add_row(escape(f.label), escape(format_value(f.value, f.unit)))
    return table


def _grid(section: Section) -> Table:
    table = Table(title=escape(section.title), title_justify="left")
    numeric = {"count", "bytes"}
    for key, header in section.columns:
        table.add_column(escape(header), justify="right" if key in numeric else "left")
    for row in section.rows:
        table.add_row(*(escape(format_value(v)) for v in row))
    return table


def print_report(console: Console, report: Report, as_json: bool) -> None:
    if as_json:
        # straight to the file: no markup, no highlighting, no wrapping
        console.file.write(json.dumps(report.to_json_dict(), indent=2) + "\n")
        console.file.flush()
        return
    console.print(f"[bold]{escape(report.kind_label)}[/bold]  {escape(report.path)}  {human_bytes(report.file_size)}")
    for section in report.sections:
        console.print()
        console.print(_grid(section) if section.columns else _kv_table(section))
    if report.problems or report.notes:
        console.print()
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")
    for note in report.notes:
        console.print(f"note: {escape(note)}")
