"""The refinement dataflow: source -> read -> decode -> refine -> encode -> Parquet parts."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import ray

from hqsam.pipeline.decode_images import DecodeImages
from hqsam.pipeline.encode_masks import encode_masks
from hqsam.pipeline.read_images import read_image_bytes
from hqsam.pipeline.refine_masks import RefineMasks
from hqsam.pipeline.write_parquet import WriteParquetParts

# Host memory a refine actor needs (weights, activations); asking for it also keeps Ray from
# fusing the IO and decode stages into the refine actor.
ACTOR_MEMORY_GIB = {"vit_tiny": 2, "vit_b": 3, "vit_l": 5, "vit_h": 8}

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


def source_blocks(tasks: pa.Table, batch_size: int) -> list[pa.Table]:
    """Small blocks (a few refine batches each) so work spreads over the actors, at most MAX_SOURCE_BLOCKS."""
    block_rows = max(batch_size, 8, -(-tasks.num_rows // MAX_SOURCE_BLOCKS))
    return [tasks.slice(start, block_rows) for start in range(0, tasks.num_rows, block_rows)] or [tasks]


def build_refine_dataset(tasks: pa.Table, out: str, settings: RefineSettings) -> ray.data.Dataset:
    """A lazy dataset whose rows are (image_id, statuses) for each image written to OUT."""
    return (
        ray.data.from_arrow(source_blocks(tasks, settings.batch_size))
        .map(read_image_bytes)
        .map(DecodeImages(settings.box_source))
        .map_batches(
            RefineMasks,
            fn_constructor_args=(settings.variant, settings.checkpoint, settings.hq_head, settings.device),
            fn_constructor_kwargs={
                "max_prompts": settings.max_prompts,
                "hq_token_only": settings.hq_token_only,
                "torch_threads": settings.torch_threads,
                "precision": settings.precision,
                "compile": settings.compile,
                "crop_zoom": settings.crop_zoom,
            },
            batch_size=settings.batch_size,
            batch_format="numpy",
            # One call at a time per actor (max_concurrency 1) either way; this runs it on the actor's
            # main thread instead of a helper thread, where the same CPU refine took ~40% longer
            # (2-core CPU, vit_tiny, measured with benchmarks/pipeline.py's data).
            compute=ray.data.ActorPoolStrategy(
                min_size=settings.min_actors, max_size=settings.max_actors, enable_true_multi_threading=True
            ),
            num_gpus=1 if settings.device.startswith("cuda") else 0,
            memory=ACTOR_MEMORY_GIB[settings.variant] * 2**30,
        )
        .map(encode_masks)
        .map_batches(
            WriteParquetParts(out, settings.variant),
            batch_size=settings.images_per_file,
            batch_format="numpy",
        )
    )
