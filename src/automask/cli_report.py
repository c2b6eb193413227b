"""`automask batch`'s progress on stderr: a bar on a terminal, else one plain line per file, and the summary."""

from __future__ import annotations

from pathlib import Path

from automask.cli_io import one_line


class Reporter:
    """Progress on stderr: a rich bar on a terminal, else one plain line per file."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total, self.count = total, 0
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        from rich.table import Column

        # a long file name is cut ('…'), not given the whole line: the bar, the count and the time left stay shown
        name = Column(ratio=1, min_width=10, max_width=40, no_wrap=True, overflow="ellipsis")
        text = TextColumn("{task.description}", markup=False, table_column=name)
        columns = (text, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.bar = Progress(*columns, console=self.console) if self.console.is_terminal else None
        self.task = self.bar.add_task("masking", total=total) if self.bar else None

    def __enter__(self) -> Reporter:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def start(self, src: Path) -> None:
        """Show `src` as the file being worked on."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=one_line(src.name))

    def done(self, line: str) -> None:
        """Count one file as handled; `line` is printed when there is no bar."""
        self.count += 1
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1)
        else:
            self.console.print(f"[{self.count}/{self.total}] {one_line(line)}", markup=False)

    def error(self, line: str) -> None:
        """Print one error line (above the bar), a line break in a file name folded."""
        self.console.print(one_line(line), markup=False, style="red" if self.bar else None)

    def summary(self, failed: int, interrupted: bool = False) -> None:
        """The last line: "12 done, 1 failed", and ", 30 not done" for a run `interrupted` (the bar stopped first)."""
        if self.bar:
            self.bar.stop()
        left = f", {self.total - self.count} not done" if interrupted else ""
        self.console.print(f"{self.count - failed} done, {failed} failed{left}", markup=False)
