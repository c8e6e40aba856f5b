"""The refinement chain: source -> ReadImages -> DecodeImages -> RefineMasks -> EncodeMasks ->
JudgeRows -> WriteParquetParts. The same list of stages runs under Ray Data (`build_refine_dataset`) and in
one process (`pipeline.stage.run_local`: tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

from hqsam.hqsam_core.acceptance import DEFAULT_POLICY
from hqsam.hqsam_core.guided import Guidance
from hqsam.pipeline.decode_images import DecodeImages
from hqsam.pipeline.encode_masks import EncodeMasks
from hqsam.pipeline.judge_rows import JudgeRows
from hqsam.pipeline.read_images import ReadImages
from hqsam.pipeline.refine_masks import RefineMasks
from hqsam.pipeline.stage import Stage, apply_ray
from hqsam.pipeline.write_parquet import WriteParquetParts


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
    # the prompts (hqsam_core/guided.py): box, box+points (rounds, points, trials) or box+mask
    prompt: str = "box"
    prompt_rounds: int = 1
    prompt_points: int = 2
    prompt_trials: int = 3
    min_region_area: int = 0  # holes and islands under this many pixels are removed from each mask
    accept: str = DEFAULT_POLICY  # the acceptance policy (hqsam_core/acceptance.py)
    images_per_file: int = 512
    # Every output row's `model`: the variant and its weights (run_identity.weights_label), e.g.
    # vit_tiny:sha256=<12 hex> or vit_tiny:random; None writes the variant alone.
    model_label: str | None = None

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.prompt, self.prompt_rounds, self.prompt_points, self.prompt_trials)

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
        JudgeRows(settings.accept),
        WriteParquetParts(out, settings.model_column, settings.images_per_file),
    ]


def build_refine_dataset(source, out: str, settings: RefineSettings):
    """A lazy Ray dataset whose rows are (image_id, statuses) for each task row of the Ray dataset
    `source` (pipeline/task_source.py) written to `out`."""
    return apply_ray(source, refine_stages(out, settings), keep_going=True)
