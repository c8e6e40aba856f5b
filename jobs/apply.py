"""`hqsam apply`: the final COCO file of a refine output with a person's review decisions over the
acceptance policy's (the run: pipeline/decisions.py, writing through pipeline/write_coco.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import REFINED_OUT_ARGUMENT, VERBOSE_OPTION


def apply(
    out: str = REFINED_OUT_ARGUMENT,
    decisions: str = typer.Option(
        ...,
        "--decisions",
        metavar="FILE",
        help="decisions.json, as exported from the page of `hqsam review OUT`.",
    ),
    annotations: str | None = typer.Option(
        None,
        "--annotations",
        metavar="IN",
        help="The run's input COCO file. Default: the input recorded in OUT/_hqsam_run.json.",
    ),
    to: str | None = typer.Option(
        None, "--to", metavar="PATH", help="Where to write the COCO file. Default: OUT/annotations.json."
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Write the final COCO file, a person's review decisions taking precedence over the policy.

    The refined mask replaces the original where a person accepted it, or where nobody decided and
    the acceptance policy accepted it (a row without a verdict, from an OUT written before the policy,
    counts as accepted); everywhere else the original annotation stays as it was. Each annotation's
    `hqsam` object records `accepted` and `decided_by` (policy or person). A decisions file made for
    another OUT, or naming a row OUT does not have, is refused.
    """
    from hqsam.pipeline.decisions import apply_decisions

    applied = apply_decisions(out, decisions, annotations=annotations, to=to)
    tally = applied.tally
    taken = tally["person", True] + tally["policy", True]
    kept = tally["person", False] + tally["policy", False] + tally["status", False]
    typer.echo(
        f"{taken} refined masks taken ({tally['person', True]} by you, {tally['policy', True]} by the "
        f"policy), {kept} originals kept ({tally['person', False]} by you, {tally['policy', False]} by "
        f"the policy, {tally['status', False]} not refined) -> {applied.uri}"
    )
