"""`probllm feedback export`: the votes of the chat page (`serve --feedback`) as training records (logic in
probllm/feedback.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from probllm.cli.app import Limit, ProbllmGroup, ProbllmTyper, SummaryFile, app, command
from probllm.cli.choices import FeedbackKind, value



class CommandGroup(ProbllmGroup):
    """A group of commands under one name (`probllm feedback export`): probllm's help and one-line errors, its
    few commands listed as click lists them, not under the top level's families."""

    def list_commands(self, ctx) -> list[str]:
        return TyperGroup.list_commands(self, ctx)

    def format_commands(self, ctx, formatter) -> None:
        TyperGroup.format_commands(self, ctx, formatter)


feedback_app = ProbllmTyper(
    name="feedback",
    cls=CommandGroup,
    help=("Students' votes from the chat page (`probllm serve --feedback FILE.sqlite`) as training data.\n\n"
          "    probllm feedback export feedback.sqlite \\\n"
          "        | probllm pair-annotated > pairs.jsonl"),
    no_args_is_help=True,
)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def export_command(
    file: Annotated[Path, typer.Argument(help="The .sqlite file of `serve --feedback` (it may be in use by the "
                                         "server).", show_default=False)],
    kind: Annotated[FeedbackKind, typer.Option("--kind", help="comparisons: student-annotated records for "
                                               "`pair-annotated`; ratings: thumbs up/down as KTO records "
                                               "(prompt, completion, label).")] = FeedbackKind.comparisons,
    since: Annotated[Optional[str], typer.Option("--since", help="Only votes after this row id (the `last id` "
                                                 "the previous export printed) or after this UTC time "
                                                 "(2026-03-02 or 2026-03-02T12:00).", show_default=False)] = None,
    limit: Limit = None,
    summary: SummaryFile = None,
) -> None:
    """Export the chat page's votes as JSONL, oldest first; counts and the last row id on stderr.

    Comparisons come out in the student-annotated format (`pair-annotated` turns them into DPO pairs and drops
    ties and both-wrong by its rules); `--kind ratings` gives TRL's unpaired records for `probllm kto`. Every
    record keeps the vote's id, session, time, models, settings and sources. A vote changed after an export
    (a comment added) comes out again with the same `feedback_id`.

        probllm feedback export feedback.sqlite \\
            | probllm pair-annotated > pairs.jsonl
        probllm feedback export feedback.sqlite --kind ratings --since 120 \\
            > ratings.kto.jsonl
    """
    from probllm.feedback import export
    from probllm.io import write_records

    with command("feedback export", summary) as stats:
        write_records(export(file, value(kind), stats, since=since, limit=limit), stats)
