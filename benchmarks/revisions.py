"""Benchmark: benchmarks/pipeline.py's contestants on an older commit against the working tree, A B A B.

On a machine whose load drifts (other work shares its cores), two benchmark runs made apart cannot
be compared; this runs the same measured functions (pipeline.py's `bare` and `stages` children, each
in a fresh process) from both code bases in turn, on the same data and weights, and reports per
side the min and median of the children's own timings (model load excluded) and the ratio
new/old pair by pair.

The older commit is `git archive`d into a temp dir with a folder `hqsam/` of links to its packages
first on PYTHONPATH, so that `import hqsam...` in its children loads that commit's code; the
working tree's children load the installed (editable) project. Each side runs its own
benchmarks/pipeline.py children.

    .venv/bin/python benchmarks/revisions.py --base 99dece1 \
        --json benchmarks/results/pipeline_revisions_cpu_vit_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, machine, write_result  # noqa: E402
from benchmarks.pipeline import write_checkpoint, write_dataset  # noqa: E402

PACKAGES = ("hqsam_core", "pipeline", "jobs", "schemas")


def checkout(revision: str, into: Path) -> dict[str, str]:
    """`revision`'s files under `into`/src and the environment that makes Python import them."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into / "src", filter="data")
    package = into / "pkg" / "hqsam"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in PACKAGES:
        (package / name).symlink_to(into / "src" / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(into / "pkg")}


def run_child(tree: Path, env: dict[str, str] | None, kind: str, spec: dict) -> dict:
    """One pipeline.py child of `tree`, in a fresh process; its RESULT plus the load after it."""
    script = tree / "benchmarks" / "pipeline.py"
    result = child_result(script, ["--child", kind, json.dumps(spec)], cwd=tree, env=env)
    return {**result, "load_average_1min_after": os.getloadavg()[0]}


def compare(args: argparse.Namespace, work: Path) -> dict:
    """Both sides' children in turn, old first in odd repeats and new first in even ones."""
    env_old = checkout(args.base, work / "base")
    checkpoint = work / "hqsam_vit_tiny_random.pth"
    write_checkpoint(checkpoint)
    data = write_dataset(work / "throughput", args.images, seed=args.seed)
    spec = {
        "checkpoint": str(checkpoint),
        "annotations": str(work / "throughput" / "annotations.json"),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "workdir": str(work),
    }
    sides = {"old": (work / "base" / "src", env_old), "new": (ROOT, None)}
    runs: dict[str, dict[str, list[dict]]] = {kind: {"old": [], "new": []} for kind in args.kinds}
    print(f"{args.images} images, {data['annotations']} boxes; {args.base} vs the working tree", flush=True)
    for repeat in range(args.repeats):
        for kind in args.kinds:
            order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
            for side in order:
                result = run_child(*sides[side], kind, spec)
                runs[kind][side].append(result)
                print(f"  {kind} {side} run {repeat + 1}: {result['seconds']:.1f} s", flush=True)
    return {"data": data, "runs": runs}


def summarize(args: argparse.Namespace, measured: dict) -> dict:
    summary = {}
    for kind, sides in measured["runs"].items():
        seconds = {side: [r["seconds"] for r in results] for side, results in sides.items()}
        ratios = [new / old for old, new in zip(seconds["old"], seconds["new"])]
        summary[kind] = {
            **{f"{side}_s": {"min": min(s), "median": statistics.median(s)} for side, s in seconds.items()},
            "ratio_new_over_old": {"min": min(ratios), "median": statistics.median(ratios), "each": ratios},
            "ratio_of_minimums": min(seconds["new"]) / min(seconds["old"]),
        }
    return {
        "benchmark": "benchmarks/pipeline.py children (bare, stages), an older commit vs the working tree",
        "machine": machine(),
        "params": {**vars(args), "json": str(args.json) if args.json else None, **measured["data"]},
        "summary": summary,
        "runs": measured["runs"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD", help="the older commit (default: HEAD)")
    parser.add_argument("--kinds", nargs="+", default=["bare", "stages"], choices=["bare", "stages"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hqsam-bench-revisions-") as temp:
        result = summarize(args, compare(args, Path(temp)))
    result["benchmark_wall_s"] = time.perf_counter() - started
    for kind, s in result["summary"].items():
        print(
            f"{kind:7s} old min {s['old_s']['min']:.2f} s median {s['old_s']['median']:.2f} s | "
            f"new min {s['new_s']['min']:.2f} s median {s['new_s']['median']:.2f} s | "
            f"new/old pairwise median {s['ratio_new_over_old']['median']:.3f}, "
            f"of minimums {s['ratio_of_minimums']:.3f}"
        )
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
