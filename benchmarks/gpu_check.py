"""The GPU check (issue 15): on a GPU machine, one command proves and measures the GPU path.

Steps, each in its own process with a time limit, all within `--budget-s` (default 450 s):

  tests    the CUDA-marked tests (`pytest -m cuda`): autocast, fused attention, memory probes
  vit_b    benchmarks/refiner.py: the official predictor loop in fp32 against ours in fp32, bf16 and
  vit_h    bf16 + compile on COCO-sized images with 7 boxes each; bf16-vs-fp32 mask agreement on
           ../shared/fixtures; the memory probe
  chain    the refine chain of the pipeline, Ray-free (read, decode, refine, encode, write in one
           process) on COCO-sized JPEGs, against the bare refiner on the same decoded images

Everything lands in OUT (`--out`, default $OUT): gpu_check.json (every number, the GPU named),
gpu_check.md (the tables), gpu_check.log (each step's output), refiner_<device>_<model>.json.

A GPU machine may have no package index. Fetch the wheels it lacks beforehand, where pip works,
into the git-ignored `.whl/` (Python 3.12, x86-64 Linux), and bring that folder along:

    .venv/bin/python benchmarks/gpu_check.py --fetch-wheels .whl
    python3 benchmarks/gpu_check.py --wheels .whl            # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check   # CPU, vit_tiny, 2 images

The dry run (what CI runs) takes the same steps on the CPU with vit_tiny and 2 images, so that the
check is known to work before a GPU appears. hqsam itself needs no installing: without it, the
check points Python at this checkout. Ray is not needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("hqsam_core", "pipeline", "jobs", "schemas")  # pyproject's hqsam.* packages
# What the GPU machine's Python lacks (module: the wheel fetched for it, as pyproject pins them).
WHEELS = {
    "segment_anything": "segment-anything==1.0",
    "segment_anything_hq": "segment-anything-hq==0.3",
    "pycocotools": "pycocotools==2.0.11",
    "orjson": "orjson==3.13.0",
}
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
FIXTURE_FOLDERS = (ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures")


def plan(dry_run: bool) -> dict:
    """What each step runs: the GPU check proper, or its dry run on the CPU."""
    if dry_run:
        return {
            "device": "cpu",
            "refiner": [{"model": "vit_tiny", "images": 2, "repeats": 1, "extra": ["--no-compile"]}],
            "chain": {"model": "vit_tiny", "images": 2},
            "timeouts_s": {"tests": 300, "refiner": 300, "chain": 300},
        }
    return {
        "device": "cuda",
        "refiner": [
            {"model": "vit_b", "images": 64, "repeats": 2, "extra": []},
            {"model": "vit_h", "images": 32, "repeats": 2, "extra": []},
        ],
        "chain": {"model": "vit_b", "images": 64},
        "timeouts_s": {"tests": 120, "refiner": 170, "chain": 100},
    }


# ------------------------------------------------------------------------------------- set-up


def fetch_wheels(folder: Path) -> None:
    """Download the wheels of WHEELS for CPython 3.12 on x86-64 Linux into `folder` (needs pip
    and an index)."""
    platforms = [arg for name in WHEEL_PLATFORMS for arg in ("--platform", name)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder)]
    subprocess.run([*command, *WHEELS.values()], check=True)
    print(f"wheels for the GPU check in {folder}: bring it along and pass --wheels {folder}")


def prepare_environment(
    wheels: Path | None, work: Path, modules: tuple[str, ...] = tuple(WHEELS)
) -> tuple[dict[str, str], list[str]]:
    """The environment of every step: wheels installed into `work`/site where `modules` are missing,
    and this checkout importable as `hqsam` where it is not installed; what was done."""
    done, paths = [], []
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        if wheels is None or not any(wheels.glob("*.whl")):
            raise SystemExit(f"missing {', '.join(missing)}: pass --wheels DIR (see --fetch-wheels)")
        site = work / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            + ["--no-cache-dir", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))],
            check=True,
        )
        paths.append(str(site))
        done.append(f"installed {', '.join(missing)} from {wheels}")
    if importlib.util.find_spec("hqsam") is None:
        package = work / "pkg" / "hqsam"
        package.mkdir(parents=True)
        for folder in PACKAGE_FOLDERS:
            (package / folder).symlink_to(ROOT / folder)
        paths.append(str(package.parent))
        done.append(f"hqsam imported from {ROOT}")
    paths.append(str(ROOT))  # benchmarks.* and tests.* import from the checkout
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    return env, done


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run with --dry-run for the CPU rehearsal")
        return torch.cuda.get_device_name(0)
    from benchmarks.common import cpu_model

    return f"CPU: {cpu_model()}"


# ------------------------------------------------------------------------------------- steps


class Steps:
    """Runs each step as a process with a time limit inside the overall budget; logs to one file."""

    def __init__(self, env: dict[str, str], log: Path, budget_s: float) -> None:
        self.env, self.log = env, log
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, dict] = {}

    def run(self, name: str, command: list[str], timeout_s: float) -> dict:
        left = self.deadline - time.monotonic()
        if left < 10:
            return self._record(name, {"status": "not run", "reason": "out of time"})
        limit = min(timeout_s, left)
        print(f"[{name}] {' '.join(command[1:])}  (limit {limit:.0f} s)", flush=True)
        started = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=limit
                )
                status = "passed" if done.returncode == 0 else "failed"
                result = {"status": status, "returncode": done.returncode}
            except subprocess.TimeoutExpired:
                result = {"status": "timed out", "limit_s": round(limit)}
        result["seconds"] = round(time.monotonic() - started, 1)
        return self._record(name, result)

    def _record(self, name: str, result: dict) -> dict:
        self.results[name] = result
        print(f"[{name}] {result['status']}" + (f" in {result['seconds']} s" if "seconds" in result else ""))
        return result


def cuda_test_files() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "mark.cuda" in path.read_text() or "marks=cuda" in path.read_text()
    )


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [
        case.get("classname", "") + "::" + case.get("name", "")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


# ------------------------------------------------------------------------------------- the chain


def measure_chain(model: str, device: str, images: int, batch_size: int = 16) -> dict:
    """images/s of the whole refine chain (run_local) and of the bare refiner on the same images."""
    import copy

    import numpy as np
    import torch

    from benchmarks.stage_costs import write_dataset
    from hqsam.pipeline.decode_images import DecodeImages
    from hqsam.pipeline.manifest import read_manifest
    from hqsam.pipeline.read_images import ReadImages
    from hqsam.pipeline.refine_masks import RefineMasks
    from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
    from hqsam.pipeline.stage import run_local
    from hqsam.schemas.status import Status

    def synchronized(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="hqsam-gpu-check-") as temp:
        annotations = write_dataset(Path(temp) / "data", images, 7, seed=0)
        tasks = read_manifest(str(annotations)).tasks.to_pylist()
        settings = RefineSettings(model, "random", None, device, batch_size=batch_size)
        refine = RefineMasks(settings)
        refine.setup()  # the model is built before the clock starts, for both
        decoded = DecodeImages().process(ReadImages().process(copy.deepcopy(tasks)))
        pixels = [row["pixels"] for row in decoded]
        boxes = [
            np.asarray(row["prompts"], np.float32)[[s == Status.PENDING for s in row["statuses"]]]
            for row in decoded
        ]

        def bare() -> int:
            count = 0
            for start in range(0, len(pixels), batch_size):
                for chunk in refine.refiner.refine_chunks(
                    pixels[start : start + batch_size], boxes[start : start + batch_size]
                ):
                    count += len(chunk.rows)
            return count

        def chain(pass_: int, rows: list[dict]) -> int:
            # the same refine stage (its model built), a fresh output folder each pass
            fresh = refine_stages(str(Path(temp) / f"out-{pass_}"), settings)
            fresh = [refine if isinstance(stage, RefineMasks) else stage for stage in fresh]
            return sum(1 for _ in run_local(rows, fresh))

        bare()  # warm-up: first-call costs (cuDNN choices, allocator) paid by neither
        chain(0, copy.deepcopy(tasks))
        masks, bare_s = synchronized(bare)
        rows = copy.deepcopy(tasks)
        written, chain_s = synchronized(lambda: chain(1, rows))
    return {
        "model": model,
        "device": device,
        "images": images,
        "annotations": sum(len(b) for b in boxes),
        "masks_refined": masks,
        "rows_written": written,
        "bare_refiner_images_per_s": round(images / bare_s, 2),
        "chain_images_per_s": round(images / chain_s, 2),
        "chain_vs_bare": round(bare_s / chain_s, 3),
        "non_model_ms_per_image": round(1000 * (chain_s - bare_s) / images, 2),
    }


# ------------------------------------------------------------------------------------- report


def summarize(refiner_json: Path) -> dict:
    """The few numbers of a refiner.py result that the report shows."""
    result = json.loads(refiner_json.read_text())
    contestants = {
        name: {
            "images_per_s": round(c["images_per_s_median"], 2),
            "vs_official": round(c["speedup_over_official_median"], 2),
            # the device's peak above the weights on CUDA; the process's peak RSS on the CPU
            "peak_mem_mib": round(c.get("peak_mem_mib_max") or c.get("peak_mem_total_mib_max") or 0),
        }
        for name, c in result["contestants"].items()
    }
    agreement = {
        name: round(value["mean_mask_iou"], 4)
        for name, value in (result.get("fixture_agreement") or {}).items()
        if isinstance(value, dict) and "mean_mask_iou" in value
    }
    return {
        "model": result["args"]["model"],
        "contestants": contestants,
        "fixture_mean_mask_iou_vs_fp32": agreement,
        "targets": result.get("targets", []),
        "memory_vs_boxes": result.get("memory_vs_boxes"),
    }


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", ""]
    lines += [
        f"{report['when']}, torch {report['torch']}, {'dry run' if report['dry_run'] else 'full run'}",
        "",
    ]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} |")
    tests = report.get("tests") or {}
    if tests:
        lines += [
            "",
            f"CUDA tests: {tests['passed']} passed, {len(tests['failed'])} failed, {tests['skipped']} skipped",
        ]
        lines += [f"- FAILED {name}" for name in tests["failed"]]
    for summary in report.get("refiner", []):
        lines += ["", f"## {summary['model']}: images/s (median), against the official loop", ""]
        lines += ["| contestant | images/s | x official | peak MiB |", "|---|---|---|---|"]
        for name, c in summary["contestants"].items():
            lines.append(f"| {name} | {c['images_per_s']} | {c['vs_official']} | {c['peak_mem_mib']} |")
        for name, iou in summary["fixture_mean_mask_iou_vs_fp32"].items():
            lines.append(f"\n{name} vs ours_fp32 on the fixtures: mean mask IoU {iou}")
        for target in summary["targets"]:
            verdict = "met" if target.get("met") else "MISSED"
            lines.append(f"- {target['target']} ({target['contestant']}): {target['value']:.3f}, {verdict}")
    chain = report.get("chain")
    if chain:
        lines += ["", f"## Chain ({chain['model']}, {chain['images']} COCO-sized images, 7 boxes each)", ""]
        lines += [
            f"whole chain {chain['chain_images_per_s']} images/s, bare refiner "
            f"{chain['bare_refiner_images_per_s']} images/s: {chain['chain_vs_bare']} of it; "
            f"{chain['non_model_ms_per_image']} ms per image outside the model, one process"
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT)")
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on the CPU, vit_tiny, 2 images"
    )
    parser.add_argument(
        "--wheels", type=Path, default=None, help="folder of wheels to install what is missing"
    )
    parser.add_argument(
        "--fetch-wheels", type=Path, default=None, metavar="DIR", help="download them, then stop"
    )
    parser.add_argument("--budget-s", type=float, default=450, help="all steps together (default 450)")
    parser.add_argument(
        "--chain-json", type=Path, default=None, help=argparse.SUPPRESS
    )  # the chain's process
    parser.add_argument("--chain-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chain-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    step_plan = plan(args.dry_run)
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels)
        return 0
    if args.chain_json:
        result = measure_chain(args.chain_model, step_plan["device"], args.chain_images)
        args.chain_json.write_text(json.dumps(result))
        return 0
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error("say where the results go: --out DIR or $OUT")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hqsam-gpu-check-"))
    try:
        return check(args, step_plan, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(args: argparse.Namespace, step_plan: dict, out: Path, work: Path) -> int:
    import torch

    device = step_plan["device"]
    env, prepared = prepare_environment(args.wheels, work)
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    report = {
        "benchmark": "GPU check (issue 15)",
        "device_name": device_name(device),
        "dry_run": args.dry_run,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "prepared": prepared,
    }
    log = out / "gpu_check.log"
    log.write_text("")
    steps = Steps(env, log, args.budget_s)
    timeouts = step_plan["timeouts_s"]

    junit = work / "cuda-tests.xml"
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q"]
    steps.run("tests", [*pytest, f"--junitxml={junit}", *cuda_test_files()], timeouts["tests"])
    report["tests"] = junit_counts(junit)

    fixtures = next((folder for folder in FIXTURE_FOLDERS if folder.is_dir()), FIXTURE_FOLDERS[0])
    report["refiner"] = []
    for run in step_plan["refiner"]:
        result = out / f"refiner_{device}_{run['model']}.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "refiner.py"), "--model", run["model"]]
        command += ["--device", device, "--images", str(run["images"]), "--repeats", str(run["repeats"])]
        command += ["--fixtures", str(fixtures), "--json", str(result), *run["extra"]]
        if steps.run(run["model"], command, timeouts["refiner"])["status"] == "passed":
            report["refiner"].append(summarize(result))

    chain_json = work / "chain.json"
    chain = step_plan["chain"]
    command = [sys.executable, str(Path(__file__).resolve()), "--chain-json", str(chain_json)]
    command += ["--chain-model", chain["model"], "--chain-images", str(chain["images"])]
    command += ["--dry-run"] if args.dry_run else []
    if steps.run("chain", command, timeouts["chain"])["status"] == "passed":
        report["chain"] = json.loads(chain_json.read_text())

    report["steps"] = steps.results
    failed = [name for name, step in steps.results.items() if step["status"] != "passed"]
    report["all_passed"] = not failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(
        f"wrote {out / 'gpu_check.json'} and gpu_check.md"
        + (f"; not passed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
