"""benchmarks/scale.py's synthesized OUT: rows of today's REFINED_ANNOTATION schema, one per annotation,
which write_coco reads back into a file pycocotools loads (the benchmark broke unseen when the schema grew)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from pycocotools.coco import COCO

from benchmarks.scale import arrays_path, coco_arrays, generate_objects365, synthesize_out


def test_the_synthesized_out_has_todays_schema_and_writes_a_coco_file(tmp_path) -> None:
    from hqsam.pipeline.write_coco import write_coco
    from hqsam.schemas.refined import REFINED_ANNOTATION

    source = tmp_path / "objects365.json"
    generate_objects365(source, 300, seed=0)
    info = coco_arrays(source, arrays_path(source))
    out = tmp_path / "out"
    synthesize_out(arrays_path(source), out)
    table = pq.read_table(out / "rows")
    assert table.schema.equals(REFINED_ANNOTATION, check_metadata=False)
    assert sorted(table["ann_index"].to_pylist()) == list(range(info["annotations"]))

    write_coco(str(source), str(out))
    written = COCO(str(out / "annotations.json"))
    annotations = json.loads(source.read_text())["annotations"]
    assert len(written.getAnnIds()) == len(annotations) == 300
