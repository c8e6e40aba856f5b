"""COCO mask AP and Boundary AP (COCOeval; a pair scores min(mask IoU, Boundary IoU))."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hqsam.hqsam_core.metrics import boundary_iou_batch


def coco_ap(coco_data: dict, predictions: list[dict]) -> dict[str, float]:
    """Mask AP / AP50 / AP75 and Boundary AP / AP50 / AP75 of predictions over the images they cover.

    Boundary AP is COCOeval with each (prediction, non-crowd GT) pair scored by min(mask IoU,
    Boundary IoU) (Cheng et al. 2021, dilation 2% of the image diagonal); crowd GTs keep COCO's
    crowd IoU. Values are fractions in [0, 1] (COCOeval's -1 for "no GT" becomes None).
    """
    if not predictions:
        return {}
    image_ids = sorted({p["image_id"] for p in predictions})
    ground_truth = COCO()
    data = dict(coco_data)
    data.setdefault("categories", [])
    known = {c["id"] for c in data["categories"]}
    data["categories"] = data["categories"] + [
        {"id": c} for c in sorted({p["category_id"] for p in predictions} - known)
    ]
    # COCOeval records a match as the matched GT's id and reads id 0 as "no match": renumber the
    # annotations from 1 (their ids do not enter the metric; files such as labelme's start at 0).
    data["annotations"] = [
        {"iscrowd": 0, "area": 0, **annotation, "id": k + 1}
        for k, annotation in enumerate(data.get("annotations", []))
    ]
    ground_truth.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        detections = ground_truth.loadRes(
            [{k: p[k] for k in ("image_id", "category_id", "segmentation", "score")} for p in predictions]
        )
    result = {}
    for name, evaluator_class in (("mask", COCOeval), ("boundary", BoundaryCOCOeval)):
        evaluator = evaluator_class(ground_truth, detections, "segm")
        evaluator.params.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for k, suffix in enumerate(("ap", "ap50", "ap75")):
            value = float(evaluator.stats[k])
            result[f"{name}_{suffix}"] = value if value >= 0 else None
    return result


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose pair score is min(mask IoU, Boundary IoU) for non-crowd GTs (Boundary AP)."""

    def computeIoU(self, imgId, catId):  # COCOeval's names
        ious = super().computeIoU(imgId, catId)
        if len(ious) == 0:
            return ious
        params = self.params
        if params.useCats:
            gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gts = [g for c in params.catIds for g in self._gts[imgId, c]]
            dts = [d for c in params.catIds for d in self._dts[imgId, c]]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")  # COCOeval's order
        dts = [dts[i] for i in order][: params.maxDets[-1]]
        ious = np.array(ious, dtype=np.float64)
        gt_masks = None
        for i, dt in enumerate(dts):
            # min(IoU, BIoU) is 0 where the masks do not overlap: Boundary IoU only where they do
            columns = [j for j, g in enumerate(gts) if not g["iscrowd"] and ious[i, j] > 0]
            if not columns:
                continue
            if gt_masks is None:
                gt_masks = mask_utils.decode([g["segmentation"] for g in gts]).transpose(2, 0, 1).astype(bool)
            dt_mask = mask_utils.decode(dt["segmentation"]).astype(bool)
            pairs = gt_masks[columns]
            boundary = boundary_iou_batch(np.broadcast_to(dt_mask, pairs.shape), pairs)
            ious[i, columns] = np.minimum(ious[i, columns], boundary)
        return ious
