"""The refinement chain: source -> ReadImages -> DecodeImages -> RefineMasks -> EncodeMasks ->
WriteParquetParts. The same list of stages runs under Ray Data (`build_refine_dataset`) and in
one process (`pipeline.stage.run_local`: tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from hqsam.pipeline.decode_images import DecodeImages
from hqsam.pipeline.encode_masks import EncodeMasks
from hqsam.pipeline.read_images import ReadImages
from hqsam.pipeline.refine_masks import RefineMasks
from hqsam.pipeline.stage import Stage, apply_ray
from hqsam.pipeline.write_parquet import WriteParquetParts

# ray.data.from_arrow puts each block from the driver and runs one metadata task per block: past a
# few thousand blocks that start-up dominates (COCO train in 8-image blocks: ~14,700 of each).
MAX_SOURCE_BLOCKS = 2000


@dataclass(frozen=True)
class RefineSettings:
    variant: str
    checkpoint: str
    hq_head: str | None
    device: str
    batch_size: int = 4  # images per refine call
    min_actors: int = 1
    max_actors: int = 1
    hq_token_only: bool = False
    box_source: str = "bbox"
    max_prompts: int | None = None  # None: BoxRefiner's device default
    torch_threads: int | None = None  # CPU actors: threads per actor
    precision: str | None = None  # fp32 | bf16 | fp16; None: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the decoder (first batch pays the compile)
    crop_zoom: float | None = None  # refine boxes smaller than this share of the image on a zoomed crop
    images_per_file: int = 512
    # Every output row's `model`: the variant and its weights (run_identity.weights_label), e.g.
    # vit_tiny:sha256=<12 hex> or vit_tiny:random; None writes the variant alone.
    model_label: str | None = None

    @property
    def model_column(self) -> str:
        """The `model` written in every output row: model_label, or the variant when there is none."""
        return self.model_label or self.variant


def refine_stages(out: str, settings: RefineSettings) -> list[Stage]:
    """The chain from IMAGE_TASK rows to part files in `out` (rows: schemas/refine_rows.py)."""
    return [
        ReadImages(),
        DecodeImages(settings.box_source),
        RefineMasks(settings),
        EncodeMasks(),
        WriteParquetParts(out, settings.model_column, settings.images_per_file),
    ]


def source_blocks(tasks: pa.Table, batch_size: int) -> list[pa.Table]:
    """Small blocks (a few refine batches each) so work spreads over the actors, at most MAX_SOURCE_BLOCKS."""
    block_rows = max(batch_size, 8, -(-tasks.num_rows // MAX_SOURCE_BLOCKS))
    return [tasks.slice(start, block_rows) for start in range(0, tasks.num_rows, block_rows)] or [tasks]


def build_refine_dataset(tasks: pa.Table, out: str, settings: RefineSettings):
    """A lazy Ray dataset whose rows are (image_id, statuses) for each task row written to `out`."""
    import ray

    source = ray.data.from_arrow(source_blocks(tasks, settings.batch_size))
    return apply_ray(source, refine_stages(out, settings), keep_going=True)
