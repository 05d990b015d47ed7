"""A progress bar for commands that report ``(done, total)``: rich's, gone when the work is."""

from __future__ import annotations


class ProgressBar:
    """A rich progress bar fed ``update(done, total)``; prints nothing when not on a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> ProgressBar:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 transient=True)
        self.progress.__enter__()
        self.task = None
        return self

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
