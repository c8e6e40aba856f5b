"""benchmarks/improvement.py end to end at its smallest useful size (issue 16 part 6): generated thin
structures, corrupted, `hqsam train`, `hqsam refine` per prompt with a policy, `hqsam evaluate`.

What is asserted holds by design, whatever the (weak, briefly trained) model does:
- every mIoU / boundary mIoU is finite and in [0, 1], and the corruption did corrupt (mIoU < 1);
- the written file (annotations.json under --accept) holds, per annotation, the refined mask where
  the policy accepted and the input's otherwise: its IoU with the exact mask is one of those two,
  and with nothing accepted it equals the input's;
- `hqsam evaluate`'s `original` means equal the benchmark's own on the same annotations.
Not asserted: that refining raises mIoU. The policy sees no ground truth, so it can accept a worse
mask; whether it does is what the benchmark measures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "improvement.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The benchmark's report at 8 training images, 4 steps, 8 test images (every corruption kind)."""
    folder = tmp_path_factory.mktemp("improvement")
    args = ["--train-images", "8", "--test-images", "8", "--steps", "4", "--epochs", "1"]
    args += ["--batch-size", "1", "--evaluate-limit", "2", "--policies", "iou_vs_original >= 0.5"]
    args += ["--work", str(folder / "work"), "--json", str(folder / "improvement.json")]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((folder / "improvement.json").read_text())


@pytest.mark.slow
def test_every_number_is_finite_and_a_fraction(report: dict) -> None:
    assert report["all_finite"]
    for name, entry in report["results"].items():
        values = [entry["miou"], entry["mbiou"], *entry["iou"], *entry["biou"]]
        values += [v for kind in entry["per_kind"].values() for v in (kind["miou"], kind["mbiou"])]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), name
    assert report["results"]["corrupted input"]["miou"] < 1.0


@pytest.mark.slow
def test_written_masks_are_the_refined_or_the_input(report: dict) -> None:
    results = report["results"]
    corrupted = results["corrupted input"]
    written = [name for name in results if name.startswith("written: ")]
    assert len(written) == len(report["settings"]["prompts"])  # one run per prompt, none skipped
    for name in written:
        entry = results[name]
        refined = results["refined: " + name[len("written: ") :]]
        assert entry["statuses"] == {"ok": len(corrupted["iou"])}
        for kept, before, after in zip(entry["iou"], corrupted["iou"], refined["iou"]):
            assert kept == pytest.approx(before, abs=1e-6) or kept == pytest.approx(after, abs=1e-6)
        if entry["accepted"] == 0:
            assert entry["miou"] == pytest.approx(corrupted["miou"], abs=1e-9)
            assert entry["mbiou"] == pytest.approx(corrupted["mbiou"], abs=1e-9)


@pytest.mark.slow
def test_cli_evaluation_agrees(report: dict) -> None:
    checked = report["hqsam_evaluate"]
    assert set(checked) >= {"corrupted input"}
    for entry in checked.values():
        assert entry["samples"] == 2
        assert entry["original_miou"] == pytest.approx(entry["ours_miou_same_samples"], abs=1e-6)
        assert entry["original_mbiou"] == pytest.approx(entry["ours_mbiou_same_samples"], abs=1e-6)


@pytest.mark.slow
def test_the_record_names_machine_seeds_and_commands(report: dict) -> None:
    assert report["machine"]["cores"] >= 1
    settings = report["settings"]
    assert {"train_seed", "test_seed", "corrupt_seed", "base_seed"} <= set(settings)
    assert settings["train_seed"] != settings["test_seed"]
    commands = [c["command"] for c in report["commands"]]
    assert any(c.startswith("hqsam train ") for c in commands)
    assert sum(c.startswith("hqsam refine ") and "--accept" in c for c in commands) == len(
        settings["prompts"]
    )
    kinds = {record["kind"] for record in report["data"]["corruptions"]}
    assert kinds == {"simplify", "dilate", "erode", "missing_part"}
