"""Poison inputs and lost machines: every input annotation ends as exactly one row, with its own mask.

- Geometry that crashes pycocotools' C code (a polygon coordinate of 4.3e8, a NaN, ...) is refused by
  hqsam_core.masks before it gets there; the row gets a status, its neighbours their masks.
- An input that still kills its worker (a test stage that segfaults for one image, for real) is
  retried a bounded number of times, then its rows are written as worker_crashed (pipeline/stage.py,
  pipeline/write_leftovers.py).
- `--device cuda` without a GPU is refused at once, or after a bounded wait on an autoscaling cluster.
- A node lost, or a refine actor killed, in the middle of a run on a multi-node cluster costs nothing:
  the run ends with the masks of an uninterrupted run.

Whatever could crash or hang on the code before these checks runs in a subprocess (with its own Ray
where it needs one: `python -m tests.test_fault_tolerance SCENARIO ARGS`), so that it fails the test
instead of taking pytest down; expected masks come from a bare BoxRefiner on the same pixels and boxes.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hqsam.hqsam_core.masks import polygons_to_mask, segmentation_to_mask, tight_box_pixel_edges
from hqsam.schemas.status import Status

# Not from tests.conftest: that imports torch, which cannot load under the scenarios' memory limit.
ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48  # generated images
SEED = 5  # random vit_tiny weights whose masks on these images are neither empty nor full
NAN, INF = float("nan"), float("inf")

# Polygons that crash pycocotools (a segfault; with an address-space limit for those that would
# otherwise first try to allocate tens of gigabytes).
CRASHING_POLYGONS = {
    "coordinate 4.3e8": [[0, 0, 4.3e8, 0, 4.3e8, 4.3e8]],
    "NaN": [[NAN, NAN, 5, 0, 5, 5]],
    "NaN after good points": [[1, 1, 8, 1, 8, 8, NAN, 3]],
    "infinity": [[1, 1, INF, 1, 8, 8]],
    "far outside": [[1, 1, 2e8, 1, 8, 8]],
}
# Geometry pycocotools mishandles without a crash every time: it raises a type the callers do not
# expect, reads memory it never wrote (a mask of garbage), or allocates in proportion to the outline.
MALFORMED = {
    "endless outline": [[0, 0, 500, 40] * 2000],
    "nested polygon": [[[1, 1], [8, 1], [8, 8], [1, 8], [2, 2], [3, 3]]],
    "negative run": {"size": [H, W], "counts": [-5, 100, H * W - 95]},
    "runs short of the image": {"size": [H, W], "counts": [100, 5]},
    "runs past the image": {"size": [H, W], "counts": [100, H * W]},
    "fractional runs": {"size": [H, W], "counts": [1.5, H * W - 1.5]},
    "compressed runs short of the image": {"size": [H, W], "counts": "0"},
    "compressed counts cut in a number": {"size": [H, W], "counts": "5o"},
    "compressed counts out of range": {"size": [H, W], "counts": "zz"},
    "size not integers": {"size": [H + 0.5, W], "counts": [H * W]},
}
ADDRESS_SPACE = 2 * 2**30  # for subprocesses that hand poison to pycocotools
PIPELINE_ADDRESS_SPACE = 12 * 2**30  # torch and a model too


def isolated(*args: str, timeout: float, address_space: int | None = None) -> subprocess.CompletedProcess:
    """`python -m tests.test_fault_tolerance ARGS` in its own session (all its Ray processes are
    killed afterwards), with an address-space limit if given."""
    from tests.conftest import kill_session

    def limit() -> None:
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "tests.test_fault_tolerance", *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=limit,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process)
        raise AssertionError(f"{' '.join(args)} did not end within {timeout} s") from None
    kill_session(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def last_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- geometry checks (item 1a)


@pytest.mark.parametrize("name", list(CRASHING_POLYGONS))
def test_the_poison_polygons_really_crash_pycocotools(name) -> None:
    """Proof that the inputs below are poison: handed to pycocotools directly, the process dies."""
    result = isolated(
        "pycocotools", json.dumps(CRASHING_POLYGONS[name]), timeout=120, address_space=ADDRESS_SPACE
    )
    assert result.returncode < 0, (result.returncode, result.stdout, result.stderr[-2000:])
    assert "decoded" not in result.stdout


def test_poison_geometry_is_refused_before_pycocotools_sees_it() -> None:
    """Every poison raises ValueError from segmentation_to_mask, in a process that survives them all."""
    poisons = CRASHING_POLYGONS | MALFORMED
    outcome = last_json(isolated("refuse", json.dumps(poisons), timeout=120, address_space=ADDRESS_SPACE))
    assert outcome == {name: "ValueError" for name in poisons}


def test_good_geometry_still_decodes_as_pycocotools_does() -> None:
    """Polygons a little outside the image, odd-length parts, and RLEs of every form pass the checks."""
    from hqsam.hqsam_core.masks import check_rle, compressed_runs

    outside = [[-3.5, -2, 70, 10, 30, 52], [1, 1, 8, 1, 8, 8, 2]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(outside, H, W))).astype(bool)
    np.testing.assert_array_equal(polygons_to_mask(outside, H, W), expected)
    rng = np.random.default_rng(0)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random((H, W)) < density
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        flat = mask.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
        expected_runs = [0, *runs] if flat[0] else list(runs)
        assert compressed_runs(rle["counts"]).tolist() == expected_runs
        for form in (
            rle,
            rle | {"counts": rle["counts"].decode()},
            {"size": [H, W], "counts": expected_runs},
        ):
            check_rle(form)
            np.testing.assert_array_equal(segmentation_to_mask(form, H, W), mask)


# ---------------------------------------------------------------- the chain on poison (item 1a)


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Blocky random RGB pixels: structure for the model to segment."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width])


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_images(root: Path, count: int) -> list[dict]:
    """`count` PNG textures in `root`; their COCO image records (ids 1..count)."""
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(1, count + 1):
        Image.fromarray(texture(H, W, 30 + i)).save(root / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png", "width": W, "height": H})
    return images


def plain_dataset(root: Path, count: int) -> Path:
    """`count` images with two annotations each, a polygon inside each bbox; the COCO file's path."""
    images, annotations = write_images(root, count), []
    for image in images:
        for box in ([4, 4, 30, 24], [20 + image["id"] % 3, 10, 36, 30]):
            x, y, w, h = box
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": 1, "bbox": box,
                 "segmentation": rect(x + 1, y + 1, x + w - 1, y + h - 1), "area": w * h, "iscrowd": 0}
            )  # fmt: skip
    return write_coco(root, images, annotations)


def write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = root / "annotations.json"
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(coco))
    return path


# (image id, bbox, segmentation, poisoned): annotation k of the file is POISON_DATASET[k]
GOOD_RLE = mask_utils.encode(np.asfortranarray(np.pad(np.ones((20, 24), np.uint8), ((10, 18), (10, 30)))))
POISON_DATASET = [
    (1, [4, 4, 30, 24], rect(5, 5, 33, 27), False),
    (1, [20, 10, 30, 30], CRASHING_POLYGONS["coordinate 4.3e8"], True),
    (2, [6, 6, 30, 30], MALFORMED["negative run"], True),
    (2, [10, 8, 40, 30], rect(12, 9, 48, 36), False),
    (3, [8, 4, 36, 36], MALFORMED["compressed runs short of the image"], True),
    (3, [2, 2, 20, 20], rect(3, 3, 21, 20), False),
    (4, [5, 5, 40, 30], CRASHING_POLYGONS["far outside"], True),
    (5, [10, 10, 30, 25], {"size": [H, W], "counts": GOOD_RLE["counts"].decode()}, False),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit_tiny weights (random, seed SEED) in the official format."""
    import torch

    from hqsam.hqsam_core import build_hqsam, save_model
    from hqsam.hqsam_core.testing.random_weights import randomize_

    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the prompt encoder's random Fourier features are drawn at build
        model = randomize_(build_hqsam("vit_tiny"), seed=SEED)
    path = tmp_path_factory.mktemp("weights") / f"tiny_seed{SEED}.pth"
    save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def refiner(checkpoint: Path):
    """The bare refiner with the actors' weights and one torch thread, as they have: the same masks."""
    import torch

    from hqsam.hqsam_core import BoxRefiner, build_hqsam

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield BoxRefiner(build_hqsam("vit_tiny", str(checkpoint)), "cpu")
    torch.set_num_threads(threads)


def read_out(out: Path) -> dict[int, dict]:
    """OUT's rows by annotation position; fails when an annotation has two rows."""
    files = sorted(Path(out, "rows").glob("part-*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
    by_position = {row["ann_index"]: row for row in rows}
    assert len(by_position) == len(rows), "an annotation has more than one row"
    return by_position


def row_mask(row: dict) -> np.ndarray:
    rle = row["segmentation"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)


def expected_masks(
    refiner, root: Path, boxes: dict[int, list[tuple[int, list[float]]]]
) -> dict[int, np.ndarray]:
    """The bare refiner's mask of each annotation: `boxes` maps an image id to its (annotation
    position, XYXY box) pairs, refined together as the pipeline refines one image."""
    masks = {}
    for image_id, pairs in boxes.items():
        pixels = np.asarray(Image.open(root / f"img{image_id}.png").convert("RGB"))
        (result,) = refiner.refine([pixels], [np.array([box for _, box in pairs], np.float32)])
        masks |= {position: result.masks[k] for k, (position, _) in enumerate(pairs)}
    return masks


def clipped_xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)]


def assert_ok_with_mask(row: dict, mask: np.ndarray) -> None:
    assert row["status"] == Status.OK and row["error"] is None, row
    np.testing.assert_array_equal(row_mask(row), mask)


@pytest.fixture(scope="module")
def poison_runs(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The chain (run_local) over POISON_DATASET with each box source, in a subprocess: OUT folders."""
    root = tmp_path_factory.mktemp("poison")
    images = write_images(root, 5)
    annotations = [
        {
            "id": k + 1,
            "image_id": image,
            "category_id": 1,
            "bbox": bbox,
            "segmentation": segmentation,
            "iscrowd": 0,
        }
        for k, (image, bbox, segmentation, _) in enumerate(POISON_DATASET)
    ]
    coco = write_coco(root, images, annotations)
    outs = {source: root / f"out_{source}" for source in ("bbox", "segmentation")}
    spec = {
        "annotations": str(coco),
        "checkpoint": str(checkpoint),
        "outs": {k: str(v) for k, v in outs.items()},
    }
    result = isolated("chain", json.dumps(spec), timeout=900, address_space=PIPELINE_ADDRESS_SPACE)
    assert last_json(result) == {"bbox": len(POISON_DATASET), "segmentation": len(POISON_DATASET)}
    return root, outs


@pytest.mark.slow
def test_poison_segmentation_as_box_source_is_an_invalid_box_and_neighbours_are_ok(
    poison_runs, refiner
) -> None:
    root, outs = poison_runs
    rows = read_out(outs["segmentation"])
    assert sorted(rows) == list(range(len(POISON_DATASET)))
    boxes: dict[int, list] = {}
    for position, (image, _, segmentation, poisoned) in enumerate(POISON_DATASET):
        if poisoned:
            assert rows[position]["status"] == Status.INVALID_BOX, rows[position]
            assert rows[position]["error"].startswith("no box from the segmentation: ")
            assert rows[position]["segmentation"] is None
        else:
            box = tight_box_pixel_edges(segmentation_to_mask(segmentation, H, W))
            boxes.setdefault(image, []).append((position, box))
    masks = expected_masks(refiner, root, boxes)
    assert len(masks) == 4
    for position, mask in masks.items():
        assert_ok_with_mask(rows[position], mask)
        assert rows[position]["iou_vs_original"] is not None


@pytest.mark.slow
def test_poison_segmentation_with_bbox_prompts_refines_and_leaves_the_comparison_empty(
    poison_runs, refiner
) -> None:
    root, outs = poison_runs
    rows = read_out(outs["bbox"])
    assert sorted(rows) == list(range(len(POISON_DATASET)))
    boxes: dict[int, list] = {}
    for position, (image, bbox, _, _) in enumerate(POISON_DATASET):
        boxes.setdefault(image, []).append((position, clipped_xyxy(bbox)))
    for position, mask in expected_masks(refiner, root, boxes).items():
        assert_ok_with_mask(rows[position], mask)
        poisoned = POISON_DATASET[position][3]
        assert (rows[position]["iou_vs_original"] is None) == poisoned, rows[position]
        assert (rows[position]["boundary_iou_vs_original"] is None) == poisoned


# ---------------------------------------------------------------- a worker killed by its input (1b, 1c)


def segfaulting_chain(in_task: int, on_actor: int | None = None):
    """refine_stages with test stages that segfault their process for one image: a row task after
    DecodeImages for image `in_task`, and an actor after RefineMasks for image `on_actor`. (Defined
    in a function so that Ray ships the classes by value.)"""
    import ray

    from hqsam.pipeline.refine_pipeline import refine_stages
    from hqsam.pipeline.stage import Stage

    class SegfaultInTask(Stage):
        reads = ("image_id",)
        poison = in_task  # an image id

        def process(self, rows):
            if any(row["image_id"] == self.poison for row in rows):
                ctypes.string_at(0)  # a real native crash: SIGSEGV
            return rows

    actor_poison = on_actor  # the class body below has an `on_actor` of its own

    class SegfaultOnActor(SegfaultInTask):
        on_actor = True
        batch_size = 1
        poison = actor_poison

        def ray_options(self):
            return {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 0}

    def chain(out: str, settings) -> list:
        stages = refine_stages(out, settings)
        stages.insert(2, SegfaultInTask())
        if on_actor is not None:
            stages.insert(4, SegfaultOnActor())
        return stages

    return chain


def run_segfaulting(ray_session, tasks, out: Path, settings, chain, *, keep_going: bool):
    """The Ray run of `chain` over the task folder `tasks`, as build_refine_dataset runs the real one; the exception
    it ended with, or None. Fails the test if it does not end within 10 minutes (a hang)."""
    from hqsam.pipeline.stage import apply_ray
    from hqsam.pipeline.task_source import task_dataset

    dataset = apply_ray(task_dataset(tasks), chain(str(out), settings), keep_going=keep_going)
    return consume_within(dataset, seconds=600)[0]


def consume_within(dataset, seconds: float) -> tuple[BaseException | None, list]:
    """Run `dataset` to its end: the exception it ended with (or None) and the batches it gave.
    Fails the test if it does not end within `seconds` (a hang). The run goes on in a daemon
    thread: a hung one must not keep pytest from going on, or from exiting, as an executor's would."""
    batches: list = []
    outcome: dict = {}

    def consume() -> None:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                batches.append(batch)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=consume, name="consume-within", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the Ray run did not end within {seconds} s: it hangs")
    return outcome.get("error"), batches


def refine_settings(checkpoint: Path, **changes):
    from hqsam.pipeline.refine_pipeline import RefineSettings

    return RefineSettings("vit_tiny", str(checkpoint), None, "cpu", batch_size=1, torch_threads=1, **changes)


def plain_boxes(coco: Path) -> dict[int, list]:
    boxes: dict[int, list] = {}
    for position, annotation in enumerate(json.loads(coco.read_text())["annotations"]):
        boxes.setdefault(annotation["image_id"], []).append((position, clipped_xyxy(annotation["bbox"])))
    return boxes


@pytest.fixture
def fewer_actor_retries(monkeypatch) -> None:
    """2 call retries instead of the 10 sized for a lost node's detection: an input that kills its
    actor is dropped after 3 tries, not 11 (~100 s less on 2 cores). The actors' restarts stay
    unbounded (pipeline/stage.py says why)."""
    from hqsam.pipeline import stage

    monkeypatch.setattr(stage, "ACTOR_CALL_RETRIES", 2)


@pytest.mark.slow
def test_an_input_that_kills_its_worker_ends_as_worker_crashed_rows(
    ray_session, checkpoint, refiner, tmp_path, caplog, fewer_actor_retries
):
    """Two images kill their process on every try, one in a task, one on an actor: after bounded
    retries their blocks are dropped, the other images of those blocks are refined again one by one,
    and the two images' annotations are written as worker_crashed; every other row is ok."""
    from hqsam.pipeline.stream_coco import stream_coco
    from hqsam.pipeline.write_leftovers import DROPPED, write_leftovers

    coco = plain_dataset(tmp_path / "data", 6)
    tasks = stream_coco(str(coco), str(tmp_path / "tasks"))
    out = tmp_path / "out"
    out.mkdir()
    settings = refine_settings(checkpoint)
    chain = segfaulting_chain(in_task=2, on_actor=5)
    assert run_segfaulting(ray_session, tasks, out, settings, chain, keep_going=True) is None
    assert len(read_out(out)) < 12  # the crashes took rows with them

    assert write_leftovers(tasks, str(out), settings, chain=chain) == 4, hqsam_log(caplog)
    rows = read_out(out)
    assert sorted(rows) == list(range(12))
    boxes = plain_boxes(coco)
    for image in (2, 5):
        for position, _ in boxes.pop(image):
            assert rows[position]["status"] == Status.WORKER_CRASHED, rows[position]
            assert rows[position]["error"] == DROPPED and rows[position]["segmentation"] is None
            assert rows[position]["image_id"] == image
    for position, mask in expected_masks(refiner, coco.parent, boxes).items():
        assert_ok_with_mask(rows[position], mask)


def stage_killing_its_actor_on_even_ids():
    """A stage on a one-actor pool that segfaults its process for every even `id` (defined in a
    function so that Ray ships the class by value)."""
    import ray

    from hqsam.pipeline.stage import Stage

    class KillsItsActorOnEvenIds(Stage):
        reads = ("id",)
        on_actor = True
        batch_size = 1

        def process(self, rows):
            if any(row["id"] % 2 == 0 for row in rows):
                ctypes.string_at(0)  # a real native crash: SIGSEGV
            return rows

        def ray_options(self):
            # One call at a time: a call queued on the actor when it dies uses up a try of its own
            # (its rows come back in the one-by-one pass of pipeline/write_leftovers.py).
            pool = ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1)
            return {"compute": pool, "num_cpus": 0}

    return KillsItsActorOnEvenIds()


@pytest.mark.slow
def test_inputs_that_kill_one_actor_more_often_than_a_restart_budget_do_not_hang_the_run(
    ray_session, fewer_actor_retries
):
    """16 inputs that each kill the one actor of a stage on all 3 tries: 48 deaths of one actor.
    With a bounded restart budget (44 before) the actor ended dead for good, and Ray Data's pool,
    which never replaces it, waited for it: the run hung. Now every poison block is dropped after
    its tries and the other 16 go through."""
    from hqsam.pipeline.stage import apply_ray

    source = ray_session.data.range(32, override_num_blocks=32)
    dataset = apply_ray(source, [stage_killing_its_actor_on_even_ids()], keep_going=True)
    error, batches = consume_within(dataset, seconds=900)
    assert error is None, error
    survivors = sorted(int(i) for batch in batches for i in batch["id"])
    assert survivors == list(range(1, 32, 2))


def hqsam_log(caplog: pytest.LogCaptureFixture) -> str:
    """What hqsam logged during the test (Ray Data's own records are long and many)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hqsam"))


def failing_first_start_chain(marker: Path):
    """refine_stages with an actor stage whose first start anywhere fails (it creates `marker`), as
    a model load from a flaky store would: the Ray run then fails as a whole."""
    import ray

    from hqsam.pipeline.refine_pipeline import refine_stages
    from hqsam.pipeline.stage import Stage

    class FailsFirstStart(Stage):
        on_actor = True
        batch_size = 1

        def setup(self):
            if not marker.exists():
                marker.touch()
                raise RuntimeError("the first start of this stage fails")

        def process(self, rows):
            return rows

        def ray_options(self):
            return {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 0}

    def chain(out: str, settings) -> list:
        stages = refine_stages(out, settings)
        stages.insert(3, FailsFirstStart())
        return stages

    return chain


@pytest.mark.slow
def test_a_second_pass_that_fails_as_a_whole_is_tried_again(
    ray_session, checkpoint, refiner, tmp_path, caplog
):
    """The one-by-one pass over the rows a crash took fails as a whole when an actor cannot start;
    it is run again, and every row ends refined rather than worker_crashed."""
    from hqsam.pipeline.stream_coco import stream_coco
    from hqsam.pipeline.write_leftovers import write_leftovers

    coco = plain_dataset(tmp_path / "data", 2)
    tasks = stream_coco(str(coco), str(tmp_path / "tasks"))
    out = tmp_path / "out"
    out.mkdir()  # nothing written: every row is the crash's
    chain = failing_first_start_chain(tmp_path / "started-once")
    assert write_leftovers(tasks, str(out), refine_settings(checkpoint), chain=chain) == 0, hqsam_log(caplog)
    assert "failed as a whole" in hqsam_log(caplog) and (tmp_path / "started-once").exists()
    rows = read_out(out)
    for position, mask in expected_masks(refiner, coco.parent, plain_boxes(coco)).items():
        assert_ok_with_mask(rows[position], mask)


@pytest.mark.slow
def test_a_run_that_fails_still_leaves_one_row_per_annotation(ray_session, checkpoint, tmp_path):
    """Without keep_going the run ends, bounded, at the first block that killed its worker every
    time; the annotations it had not written are written as worker_crashed with its error."""
    from hqsam.pipeline.stream_coco import stream_coco
    from hqsam.pipeline.write_leftovers import write_leftovers

    coco = plain_dataset(tmp_path / "data", 3)
    tasks = stream_coco(str(coco), str(tmp_path / "tasks"))
    out = tmp_path / "out"
    out.mkdir()
    settings = refine_settings(checkpoint)
    crash = run_segfaulting(ray_session, tasks, out, settings, segfaulting_chain(in_task=1), keep_going=False)
    assert crash is not None
    assert write_leftovers(tasks, str(out), settings, crash) == 6
    rows = read_out(out)
    assert sorted(rows) == list(range(6))
    for row in rows.values():
        assert row["status"] == Status.WORKER_CRASHED and row["segmentation"] is None
        assert row["error"].startswith("the Ray run failed before this row was written: ")
        assert "\n" not in row["error"]


def test_every_stage_runs_with_bounded_retries(tmp_path, checkpoint) -> None:
    from hqsam.pipeline.refine_pipeline import refine_stages
    from hqsam.pipeline.stage import ACTOR_CALL_RETRIES, ACTOR_RESTARTS, TASK_RETRIES, retry_options

    assert 0 < TASK_RETRIES <= ACTOR_CALL_RETRIES < 100
    assert ACTOR_RESTARTS == -1  # unbounded: the calls are bounded instead (see the test above)
    for stage in refine_stages(str(tmp_path), refine_settings(checkpoint)):
        options = retry_options(stage) | stage.ray_options()
        if stage.on_actor:
            assert options["max_restarts"] == ACTOR_RESTARTS
            assert options["max_task_retries"] == ACTOR_CALL_RETRIES
        else:
            assert options["max_retries"] == TASK_RETRIES
        retries = ("max_retries", "max_task_retries")
        assert all(options[key] >= 0 for key in retries if key in options)


# ---------------------------------------------------------------- --device cuda without a GPU (item 10)


def test_cuda_on_a_cluster_without_gpus_is_refused_at_once(ray_session) -> None:
    from hqsam.pipeline.cluster import NoGpuError, wait_for_gpus

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    started = time.monotonic()
    with pytest.raises(NoGpuError) as refused:
        wait_for_gpus("cuda", timeout_s=600)
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "needs a GPU" in message and "--device cpu" in message and "\n" not in message
    assert refused.value.exit_code == 2
    wait_for_gpus("cpu", timeout_s=600)  # a CPU run needs no GPU


@pytest.mark.slow
def test_cuda_on_an_autoscaling_cluster_waits_for_gpu_nodes_within_the_timeout() -> None:
    outcome = last_json(isolated("gpu_wait", timeout=300))
    assert outcome["cpu_only_autoscaler"]["refused"] and outcome["cpu_only_autoscaler"]["seconds"] < 30
    assert outcome["timed_out"]["refused"] and "--gpu-wait-s" in outcome["timed_out"]["message"]
    assert 3 <= outcome["timed_out"]["seconds"] < 30
    assert not outcome["node_joined"]["refused"] and outcome["node_joined"]["seconds"] < 120


# ---------------------------------------------------------------- a lost node, a killed actor


@pytest.mark.slow
def test_a_lost_node_or_a_killed_refine_actor_costs_no_row_and_changes_no_mask(checkpoint, tmp_path) -> None:
    """On a 3-node cluster (each node its own raylet): an uninterrupted run, a run during which the
    node of the refine actor is killed, and one during which the actor's process is SIGKILLed. Both
    end with one ok row per annotation, with the uninterrupted run's masks.

    What makes it so (pipeline/stage.py): the actor restarts on a node that has room for it
    (max_restarts=ACTOR_RESTARTS) and the call it was running is retried there
    (max_task_retries=ACTOR_CALL_RETRIES, spaced about a second apart until the node is known dead);
    tasks that died with the node, or whose outputs did, run again (max_retries=TASK_RETRIES); and a
    part file is named after its rows, so a write done twice replaces the file instead of adding rows.
    One image per refine call: a batch redone in other company would not give bit-equal masks."""
    coco = plain_dataset(tmp_path / "data", 12)  # two source blocks: 8 images, then 4
    spec = {"annotations": str(coco), "checkpoint": str(checkpoint), "root": str(tmp_path)}
    outcome = last_json(isolated("lost_node", json.dumps(spec), timeout=1200))
    for name in ("node", "actor"):
        assert outcome[name]["killed"] and outcome[name]["parts_at_kill"] < 12, outcome[name]
    baseline = read_out(tmp_path / "uninterrupted")
    assert sorted(baseline) == list(range(24))
    assert all(row["status"] == Status.OK for row in baseline.values())
    for name in ("node", "actor"):
        assert outcome[name]["summary"]["complete"] and outcome[name]["summary"]["annotations_ok"] == 24
        rows = read_out(tmp_path / name)
        assert sorted(rows) == sorted(baseline)
        for position, row in rows.items():
            assert row["status"] == Status.OK
            assert row["segmentation"] == baseline[position]["segmentation"], (name, position)


# ---------------------------------------------------------------- scenarios run in a subprocess


def scenario_pycocotools(polygons: str) -> None:
    mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(json.loads(polygons), H, W)))
    print("decoded")


def scenario_refuse(poisons: str) -> None:
    outcome = {}
    for name, segmentation in json.loads(poisons).items():
        try:
            segmentation_to_mask(segmentation, H, W)
            outcome[name] = "decoded"
        except Exception as error:
            outcome[name] = type(error).__name__
    print(json.dumps(outcome))


def scenario_chain(spec: str) -> None:
    """The chain in this process (run_local) with each box source; the row count written for each."""
    from hqsam.pipeline.manifest import read_manifest
    from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
    from hqsam.pipeline.stage import run_local

    spec = json.loads(spec)
    tasks = read_manifest(spec["annotations"]).tasks.to_pylist()
    written = {}
    for source, out in spec["outs"].items():
        settings = RefineSettings(
            "vit_tiny", spec["checkpoint"], None, "cpu", batch_size=1, torch_threads=1, box_source=source
        )
        Path(out).mkdir()
        written[source] = sum(len(row["statuses"]) for row in run_local(tasks, refine_stages(out, settings)))
    print(json.dumps(written))


def scenario_gpu_wait() -> None:
    """A local cluster whose 'autoscaler' reports its node types as autoscaler v2 and KubeRay do."""
    import ray
    from ray.cluster_utils import Cluster

    from hqsam.pipeline.cluster import NoGpuError, wait_for_gpus

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)

    def attempt(timeout_s: float) -> dict:
        started = time.monotonic()
        try:
            wait_for_gpus("cuda", timeout_s)
            return {"refused": False, "seconds": time.monotonic() - started}
        except NoGpuError as error:
            return {"refused": True, "seconds": time.monotonic() - started, "message": str(error)}

    outcome = {}
    report_node_types({"CPU": 4})
    outcome["cpu_only_autoscaler"] = attempt(600)
    report_node_types({"CPU": 4, "GPU": 1})
    outcome["timed_out"] = attempt(3)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Ray starts nodes from the main thread only
        waiting = pool.submit(attempt, 120)
        time.sleep(2)
        cluster.add_node(num_cpus=1, num_gpus=1)
        outcome["node_joined"] = waiting.result()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(outcome))


def report_node_types(resources: dict) -> None:
    """Record in the GCS the cluster config an autoscaler reports: one node type of `resources`."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="workers", min_count=0, max_count=2)
    for name, amount in resources.items():
        group.resources[name] = amount
    _internal_kv_put(
        ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
        config.SerializeToString(),
        overwrite=True,
        namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
    )


def scenario_lost_node(spec: str) -> None:
    """A head (tasks only: too little memory for a refine actor) and two worker nodes that can each
    hold the one refine actor; three runs: uninterrupted, node of the actor killed, actor killed."""
    import ray
    from ray.cluster_utils import Cluster

    spec = json.loads(spec)
    store = 100 * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "memory": 2**30,
            "object_store_memory": store,
            "include_dashboard": False,
        },
    )
    workers = [cluster.add_node(num_cpus=1, memory=3 * 2**30, object_store_memory=store) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def kill_node(actor: dict) -> None:
        (node,) = [n for n in workers if n.node_id == actor["Address"]["NodeID"]]
        cluster.remove_node(node, allow_graceful=False)

    def kill_actor(actor: dict) -> None:
        os.kill(actor["Pid"], signal.SIGKILL)

    root = Path(spec["root"])
    outcome = {"uninterrupted": refine_killing(spec, root / "uninterrupted", None)}
    outcome["node"] = refine_killing(spec, root / "node", kill_node)
    outcome["actor"] = refine_killing(spec, root / "actor", kill_actor)
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(outcome))


def refine_killing(spec: dict, out: Path, kill) -> dict:
    """run_refine into `out` (one image per refine call and part file), calling `kill(actor info)`
    on the refine actor once parts are written: the first source block is done, the actor works on
    the second."""
    from hqsam.pipeline.refine_run import RefineConfig, run_refine

    settings = refine_settings(Path(spec["checkpoint"]), images_per_file=1)
    config = RefineConfig(spec["annotations"], str(out), settings=settings)
    state = {"killed": False, "parts_at_kill": None}

    def watch() -> None:
        try:
            while not state.get("done"):
                parts = len(list((out / "rows").glob("part-*.parquet")))
                actor = refine_actor()
                if parts >= 2 and actor is not None:
                    kill(actor)
                    state.update(killed=True, parts_at_kill=parts)
                    return
                time.sleep(0.2)
        except Exception as error:  # reported with the outcome
            state["watch_error"] = repr(error)

    watcher = threading.Thread(target=watch, daemon=True)
    if kill is not None:
        watcher.start()
    try:
        summary = run_refine(config, progress=False)
    finally:
        state["done"] = True
    if kill is not None:
        watcher.join()
    return state | {"summary": {key: summary[key] for key in ("complete", "annotations_ok", "errors")}}


def refine_actor() -> dict | None:
    """The GCS's record of the live refine actor, if there is one."""
    import ray

    for actor in ray._private.state.actors().values():
        # Ray Data names the actor MapWorker(MapBatches(<UDF class>)); the refine stage is the chain's
        # only actor stage.
        if actor["ActorClassName"].startswith("MapWorker(") and actor["State"] == "ALIVE" and actor["Pid"]:
            return actor
    return None


if __name__ == "__main__":
    scenario, *arguments = sys.argv[1:]
    globals()[f"scenario_{scenario}"](*arguments)
