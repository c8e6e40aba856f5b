"""Read-only numpy arrays (what Ray Data and Arrow hand out) go into torch without its "The given
NumPy array is not writable" warning, and writable ones are not copied on the way."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hqsam.hqsam_core.arrays import writable

# torch warns about a non-writable array once per process, so each run needs a fresh interpreter.
READ_ONLY_PATHS = textwrap.dedent(
    """
    import warnings

    import numpy as np
    import torch

    from hqsam.hqsam_core import BoxRefiner, build_hqsam
    from hqsam.hqsam_core.evaluation import evaluate_batch_with_masks
    from hqsam.hqsam_core.metrics import boundary_iou_batch, mask_iou_batch
    from hqsam.hqsam_core.training import large_scale_jitter


    def read_only(array):
        array = np.array(array)
        array.flags.writeable = False
        return array


    rng = np.random.default_rng(0)
    image = read_only(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    gt = np.zeros((96, 128), bool)
    gt[20:60, 30:90] = True
    gt = read_only(gt)
    boxes = read_only(np.array([[30, 20, 90, 60], [0, 0, 20, 20]], np.float32))
    torch.manual_seed(0)
    model = build_hqsam("vit_tiny")
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]

    warnings.simplefilter("error")
    evaluate_batch_with_masks(model, [image], [gt], [gt], resize="square")
    mask_iou_batch(gt[None], gt[None])
    boundary_iou_batch(gt[None], gt[None])
    large_scale_jitter(image, gt, rng, size=64, flip_p=0.0)
    for device in devices:
        refiner = BoxRefiner(model.to(device), device)
        refiner.decode(refiner.encode([image]), boxes, read_only(np.zeros(2, np.int64)))
        refiner.refine([image], [boxes], crop_zoom=0.5)
    print("no warning on", ", ".join(devices))
    """
)


@pytest.mark.slow  # a fresh interpreter and a few CPU encodes of a random vit_tiny
def test_read_only_arrays_reach_torch_without_a_warning() -> None:
    done = subprocess.run(
        [sys.executable, "-c", READ_ONLY_PATHS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no warning on cpu" in done.stdout


def test_writable_shares_writable_arrays_and_copies_read_only_ones() -> None:
    shared = np.arange(6, dtype=np.float32)
    assert writable(shared) is shared
    assert torch.from_numpy(writable(shared)).data_ptr() == shared.ctypes.data

    frozen = np.arange(6, dtype=np.float32)
    frozen.flags.writeable = False
    copied = writable(frozen)
    assert copied is not frozen and copied.flags.writeable
    np.testing.assert_array_equal(copied, frozen)

    tensor = torch.zeros(3)
    assert writable(tensor) is tensor
