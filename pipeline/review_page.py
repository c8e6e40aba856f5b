"""The page of `hqsam review`: which rows need a person's eye first, the quality columns'
distributions per category, and index.html itself (inline CSS, JS and SVG; no network).

Order of the queue (`review_order`): rows the acceptance policy rejected (`accepted` false) first,
then ascending by the lowest of `stability`, `sam_hq_iou` and `iou_vs_original` (missing values
ignored; rows with none of the three after all others), then by `ann_index`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

QUALITY_COLUMNS = ("stability", "sam_hq_iou", "iou_vs_original", "boundary_iou_vs_original", "score")
ORDER_COLUMNS = ("stability", "sam_hq_iou", "iou_vs_original")
ORDERING = (
    "rejected by the policy first, then ascending by the lowest of stability, sam_hq_iou and "
    "iou_vs_original (rows with none of them last), then by ann_index"
)
BINS = 20  # histogram bins over [0, 1]; values outside are counted in the end bins
CATEGORY_CAP = 12  # categories charted on their own (the most frequent); the rest are "other"
ALL, OTHER = "all", "other"
DECISIONS_VERSION = 1  # the "hqsam_decisions" value of a decisions file


# --- order --------------------------------------------------------------------------------------


def _values(table: pa.Table, column: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return pc.fill_null(table[column].cast(pa.float64()), math.nan).to_numpy()


def rejected(table: pa.Table) -> np.ndarray:
    """Per row: the policy rejected it (`accepted` false; null is no verdict)."""
    return pc.fill_null(pc.equal(table["accepted"], False), False).to_numpy(zero_copy_only=False)


def lowest_quality(table: pa.Table) -> np.ndarray:
    """Per row, the lowest of ORDER_COLUMNS (NaN ignored), +inf where all are missing."""
    lowest = np.fmin.reduce(np.stack([_values(table, column) for column in ORDER_COLUMNS]), axis=0)
    return np.where(np.isnan(lowest), math.inf, lowest)


def review_order(table: pa.Table) -> np.ndarray:
    """Indices of `table`'s rows (ok rows with the QUALITY_COLUMNS, `accepted` and `ann_index`) in
    the order a person should see them (the module's docstring)."""
    if not table.num_rows:
        return np.zeros(0, np.int64)
    keys = (table["ann_index"].to_numpy(), lowest_quality(table), ~rejected(table))
    return np.lexsort(keys)  # the last key sorts first


# --- charts -------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """One small multiple: a quality column's values over the ok rows of one category group."""

    column: str
    group: str
    counts: list[int]  # rows per bin
    rejected: list[int]  # of them, rejected by the policy
    missing: int  # rows without a value

    @property
    def total(self) -> int:
        return sum(self.counts) + self.missing


def category_groups(category_ids: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, list[str]]:
    """(label per row, labels in chart order): the CATEGORY_CAP most frequent categories by
    name (ties by id), the others together as OTHER; when only one more would be left over it is
    shown on its own instead. `category_ids` holds -1 for rows without one (always OTHER)."""
    ids, counts = np.unique(category_ids[category_ids >= 0], return_counts=True)
    ranked = [int(i) for i in ids[np.lexsort((ids, -counts))]]
    has_none = bool((category_ids < 0).any())
    if len(ranked) + has_none <= CATEGORY_CAP + 1:
        shown = ranked
    else:
        shown = ranked[:CATEGORY_CAP]
    labels = {cid: category_label(cid, names) for cid in shown}
    per_row = np.array([labels.get(int(c), OTHER) for c in category_ids], dtype=object)
    order = [labels[cid] for cid in shown]
    if len(shown) < len(ranked) or has_none:
        order.append(OTHER)
    return per_row, order


def category_label(category_id: int | None, names: dict[int, str]) -> str:
    if category_id is None or category_id < 0:
        return OTHER
    name = names.get(category_id)
    return f"{name} ({category_id})" if name else f"category {category_id}"


def histograms(table: pa.Table, names: dict[int, str]) -> list[Histogram]:
    """Per quality column: one histogram over all ok rows (when there is more than one group),
    then one per category group (category_groups)."""
    category_ids = pc.fill_null(table["category_id"], -1).to_numpy()
    per_row, groups = category_groups(category_ids, names)
    is_rejected = rejected(table)
    selections = ([(ALL, np.ones(len(per_row), bool))] if len(groups) > 1 else []) + [
        (group, per_row == group) for group in groups
    ]
    charts = []
    for column in QUALITY_COLUMNS:
        values = _values(table, column)
        bins = np.clip(np.floor(np.nan_to_num(values, nan=0.0) * BINS), 0, BINS - 1).astype(int)
        present = ~np.isnan(values)
        for group, chosen in selections:
            here = chosen & present
            charts.append(
                Histogram(
                    column,
                    group,
                    np.bincount(bins[here], minlength=BINS).tolist(),
                    np.bincount(bins[here & is_rejected], minlength=BINS).tolist(),
                    int((chosen & ~present).sum()),
                )
            )
    return charts


CHART_W, CHART_H, CHART_PAD = 168, 56, 2


def chart_svg(chart: Histogram) -> str:
    """A histogram as inline SVG: bars per bin (rejected rows stacked in red), hover titles."""
    e = html.escape
    peak = max(chart.counts) or 1
    width = (CHART_W - 2 * CHART_PAD) / BINS
    bars = []
    for k, (count, bad) in enumerate(zip(chart.counts, chart.rejected)):
        if not count:
            continue
        x = CHART_PAD + k * width
        tall = (CHART_H - 2 * CHART_PAD) * count / peak
        low = (CHART_H - 2 * CHART_PAD) * bad / peak
        span = f"{k / BINS:.2f}-{(k + 1) / BINS:.2f}"
        tip = f"{span}: {count} rows" + (f", {bad} rejected" if bad else "")
        top = CHART_H - CHART_PAD - tall
        bars.append(
            f'<rect class="bar" data-n="{count}" x="{x:.1f}" y="{top:.1f}" width="{width - 1:.1f}" '
            f'height="{tall:.1f}"><title>{tip}</title></rect>'
        )
        if bad:
            bars.append(
                f'<rect class="bad" x="{x:.1f}" y="{CHART_H - CHART_PAD - low:.1f}" '
                f'width="{width - 1:.1f}" height="{low:.1f}"><title>{tip}</title></rect>'
            )
    missing = f", {chart.missing} n/a" if chart.missing else ""
    return (
        f'<figure class="chart"><figcaption>{e(chart.group)} <span class="dim">'
        f"{chart.total - chart.missing}{missing}</span></figcaption>"
        f'<svg class="hist" data-column="{e(chart.column)}" data-group="{e(chart.group)}" '
        f'data-total="{chart.total}" data-missing="{chart.missing}" width="{CHART_W}" '
        f'height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" role="img">'
        f'<line x1="0" y1="{CHART_H - 1}" x2="{CHART_W}" y2="{CHART_H - 1}" class="axis"/>'
        f"{''.join(bars)}</svg>"
        '<div class="ticks"><span>0</span><span>0.5</span><span>1</span></div></figure>'
    )


def charts_html(charts: list[Histogram]) -> str:
    """The charts, a row of small multiples per quality column."""
    parts = ['<div class="columns">']
    for column in QUALITY_COLUMNS:
        mine = [chart for chart in charts if chart.column == column]
        if mine:
            parts.append(
                f'<section class="column"><h3>{html.escape(column)}</h3><div class="multiples">'
                + "".join(chart_svg(chart) for chart in mine)
                + "</div></section>"
            )
    return "".join(parts) + "</div>"


# --- page ---------------------------------------------------------------------------------------


def page_data(out: str, page_id: str, queue: list[dict], skipped: list[dict], summary: dict) -> dict:
    """What the page's script reads: the queue's rows, the rows left out and why, the summary."""
    return {
        "hqsam_review": 1,
        "out": out,
        "page": page_id,
        "columns": list(QUALITY_COLUMNS),
        "ordering": ORDERING,
        "summary": summary,
        "queue": queue,
        "skipped": skipped,
    }


def embedded_json(data: dict) -> str:
    """`data` as JSON text safe inside <script>: no "</script>" or "<!--" can appear ("<" is only
    ever inside strings, where \\u003c reads the same)."""
    return orjson.dumps(data).decode().replace("<", "\\u003c")


def page_html(data: dict, charts: list[Histogram]) -> str:
    """index.html: summary, charts, then the queue the script draws from the embedded data."""
    e = html.escape
    summary = data["summary"]
    statuses = ", ".join(f"{status} {count}" for status, count in summary["statuses"].items())
    policy = summary["policy"]
    return PAGE.format(
        title=e(f"hqsam review of {data['out']}"),
        style=STYLE,
        script=SCRIPT,
        data=embedded_json(data),
        summary=e(
            f"{summary['rows']} rows ({statuses}). Of the {summary['ok']} ok rows the policy "
            f"accepted {policy['accepted']}, rejected {policy['rejected']}, gave no verdict on "
            f"{policy['none']} (an OUT written before the policy: apply takes them as accepted)."
        ),
        shown=e(
            f"The {len(data['queue'])} rows below are the ok rows that most need a look: "
            f"{ORDERING}." + (f" {len(data['skipped'])} more could not be shown." if data["skipped"] else "")
        ),
        originals=""
        if summary["originals"]
        else '<p class="note">No --annotations (and no run record naming the input): the original '
        "masks are unknown, so rows show the refined mask only.</p>",
        charts=charts_html(charts),
        orange="rgb(255,140,0)",
        cyan="rgb(0,255,255)",
    )


STYLE = """
:root { --fg: #1d232a; --dim: #68717a; --line: #d9dde1; --focus: #1f6feb; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); margin: 0; background: #f6f7f8; }
header, main, #charts { padding: 0 1.5em; }
h1 { font-size: 1.3em; margin: .8em 0 .3em; word-break: break-all; }
h2 { font-size: 1.1em; margin: 1em 0 .4em; }
h3 { font-size: .95em; margin: .6em 0 .2em; font-family: monospace; }
.dim { color: var(--dim); }
.note { color: #a04000; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: -1px; margin: 0 .3em 0 .8em; }
.columns { display: flex; flex-wrap: wrap; gap: 0 2em; }
.multiples { display: flex; flex-wrap: wrap; gap: .4em; }
figure.chart { margin: 0; background: #fff; border: 1px solid var(--line); padding: 3px 4px; }
figure.chart figcaption { font-size: 11px; max-width: 168px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
svg.hist .bar { fill: #5b8fd9; } svg.hist .bad { fill: #d9534f; } svg.hist .axis { stroke: #bbb; }
.ticks { display: flex; justify-content: space-between; font-size: 9px; color: var(--dim); }
#bar { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: .5em 1.5em; display: flex; flex-wrap: wrap; gap: .4em 1.2em; align-items: center; }
#bar button { font: inherit; padding: .25em .9em; cursor: pointer; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; font-size: .85em; background: #fafafa; }
#queue { list-style: none; padding: 0; margin: .8em 0; }
.row { display: flex; flex-wrap: wrap; gap: 1em; background: #fff; border: 2px solid var(--line);
  border-radius: 6px; padding: .6em; margin-bottom: .8em; scroll-margin-top: 4.5em; }
.row.current { border-color: var(--focus); box-shadow: 0 0 0 3px rgba(31,111,235,.25); }
.row.accept { background: #eefaf0; } .row.reject { background: #fdeeee; } .row.skip { opacity: .65; }
.row figure { margin: 0; }
.row figure img { display: block; max-width: 320px; max-height: 320px; image-rendering: auto; }
.row figcaption { font-size: 12px; color: var(--dim); }
.info { min-width: 260px; flex: 1; }
.info table { border-collapse: collapse; margin: .3em 0; }
.info td { padding: 1px .8em 1px 0; font-variant-numeric: tabular-nums; }
.info td.low { color: #c0392b; font-weight: 600; }
.verdict.rejected { color: #c0392b; } .verdict.accepted { color: #1e7b34; }
.decision { font-weight: 600; }
.buttons button { font: inherit; margin-right: .3em; cursor: pointer; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("hqsam-data").textContent);
  const queue = data.queue;
  const store = "hqsam-review:" + data.page;
  const LOW = 0.8;  // values below it are marked, as a hint only: the policy decides
  let decisions = {};
  try { decisions = JSON.parse(localStorage.getItem(store) || "{}"); } catch (e) { decisions = {}; }
  let current = 0;
  const list = document.getElementById("queue");
  const rows = [];

  function text(tag, value, cls) {
    const node = document.createElement(tag);
    node.textContent = value;
    if (cls) node.className = cls;
    return node;
  }
  function number(value) { return value === null || value === undefined ? "n/a" : value.toFixed(3); }
  function figure(src, caption) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src; img.alt = caption; img.loading = "lazy";
    fig.appendChild(img); fig.appendChild(text("figcaption", caption));
    return fig;
  }
  function verdict(row) {
    if (row.accepted === true) return ["policy: accept", "verdict accepted"];
    if (row.accepted === false)
      return ["policy: reject" + (row.rejected_by ? " (" + row.rejected_by + ")" : ""), "verdict rejected"];
    return ["policy: no verdict (taken as accept)", "verdict"];
  }

  queue.forEach(function (row, index) {
    const item = document.createElement("li");
    item.className = "row";
    item.dataset.annIndex = row.ann_index;
    if (row.crops[0]) item.appendChild(figure(row.crops[0], "original (orange)"));
    item.appendChild(figure(row.crops[1], row.crops[0] ? "refined (cyan), original outlined" : "refined (cyan)"));
    const info = document.createElement("div");
    info.className = "info";
    info.appendChild(text("div", "#" + (index + 1) + "  image " + row.image_id + " · annotation " +
      row.annotation_id + " · ann_index " + row.ann_index));
    info.appendChild(text("div", row.category + (row.prompt ? " · prompt " + row.prompt : ""), "dim"));
    const table = document.createElement("table");
    data.columns.forEach(function (column) {
      const tr = document.createElement("tr");
      const value = row.values[column];
      tr.appendChild(text("td", column));
      tr.appendChild(text("td", number(value), value !== null && value < LOW ? "low" : ""));
      table.appendChild(tr);
    });
    info.appendChild(table);
    const [said, cls] = verdict(row);
    info.appendChild(text("div", said, cls));
    if (row.note) info.appendChild(text("div", row.note, "note"));
    const decision = text("div", "", "decision");
    info.appendChild(decision);
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    [["accept", "a"], ["reject", "r"], ["skip", "s"]].forEach(function (pair) {
      const button = text("button", pair[0] + " (" + pair[1] + ")");
      button.type = "button";
      button.addEventListener("click", function (event) {
        event.stopPropagation(); focus(index); decide(pair[0]);
      });
      buttons.appendChild(button);
    });
    info.appendChild(buttons);
    item.appendChild(info);
    item.addEventListener("click", function () { focus(index); });
    list.appendChild(item);
    rows.push({ item: item, decision: decision });
    show(index);
  });

  const skippedList = document.getElementById("skipped");
  data.skipped.forEach(function (row) {
    const item = text("li", "image " + row.image_id + " · annotation " + row.annotation_id +
      " · ann_index " + row.ann_index + ": " + row.note, "skipped");
    item.dataset.annIndex = row.ann_index;
    skippedList.appendChild(item);
  });
  document.getElementById("skipped-section").hidden = data.skipped.length === 0;

  function show(index) {
    const kind = decisions[queue[index].ann_index];
    const row = rows[index];
    row.item.classList.remove("accept", "reject", "skip");
    if (kind) row.item.classList.add(kind);
    row.item.dataset.decision = kind || "";
    row.decision.textContent = kind ? "you: " + kind : "";
  }
  function counts() {
    const tally = { accept: 0, reject: 0, skip: 0 };
    queue.forEach(function (row) { const k = decisions[row.ann_index]; if (k) tally[k] += 1; });
    const node = document.getElementById("counts");
    const open = queue.length - tally.accept - tally.reject - tally.skip;
    node.dataset.accept = tally.accept; node.dataset.reject = tally.reject;
    node.dataset.skip = tally.skip; node.dataset.undecided = open;
    node.textContent = (queue.length ? "row " + (current + 1) + " of " + queue.length : "no rows") +
      " · " + tally.accept + " accepted · " + tally.reject + " rejected · " + tally.skip +
      " skipped · " + open + " undecided";
  }
  function focus(index, scroll) {
    if (!queue.length) return;
    current = Math.max(0, Math.min(queue.length - 1, index));
    rows.forEach(function (row, k) { row.item.classList.toggle("current", k === current); });
    if (scroll) rows[current].item.scrollIntoView({ block: "nearest" });
    counts();
  }
  function decide(kind) {
    if (!queue.length) return;
    decisions[queue[current].ann_index] = kind;
    try { localStorage.setItem(store, JSON.stringify(decisions)); } catch (e) { /* file:// may refuse */ }
    show(current);
    focus(current + 1, true);
  }
  function undo() {
    if (!queue.length) return;
    delete decisions[queue[current].ann_index];
    try { localStorage.setItem(store, JSON.stringify(decisions)); } catch (e) { /* as above */ }
    show(current); counts();
  }
  function exported() {
    const made = [];
    queue.forEach(function (row) {
      const kind = decisions[row.ann_index];
      if (kind === "accept" || kind === "reject")
        made.push({ ann_index: row.ann_index, annotation_id: row.annotation_id, decision: kind });
    });
    return { hqsam_decisions: 1, out: data.out, decisions: made };
  }
  function download() {
    const blob = new Blob([JSON.stringify(exported(), null, 1) + "\n"], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "decisions.json";
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }
  window.hqsamExport = exported;  // for scripts and tests: the decisions as they would be saved

  document.getElementById("export").addEventListener("click", download);
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;  // the browser's own shortcuts
    const moves = { j: 1, ArrowDown: 1, ArrowRight: 1, k: -1, ArrowUp: -1, ArrowLeft: -1 };
    const acts = { a: "accept", r: "reject", s: "skip" };
    if (event.key in moves) focus(current + moves[event.key], true);
    else if (event.key in acts) decide(acts[event.key]);
    else if (event.key === "u") undo();
    else if (event.key === "e") download();
    else return;
    event.preventDefault();
  });
  focus(0);
  document.body.dataset.ready = "1";
})();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head><body>
<header>
<h1>{title}</h1>
<p class="summary">{summary}</p>
<p class="legend"><span class="swatch" style="background:{orange}"></span>original mask
<span class="swatch" style="background:{cyan}"></span>refined mask
<span class="swatch" style="background:#d9534f"></span>rejected by the policy (charts)</p>
{originals}
</header>
<section id="charts"><h2>Quality per category (ok rows; bins of 0.05 from 0 to 1)</h2>{charts}</section>
<div id="bar"><span id="counts"></span>
<span class="dim"><kbd>a</kbd> accept <kbd>r</kbd> reject <kbd>s</kbd> skip <kbd>u</kbd> undo
<kbd>j</kbd>/<kbd>k</kbd> or arrows next/previous <kbd>e</kbd> export</span>
<button id="export" type="button">Export decisions.json</button></div>
<main>
<p class="dim">{shown} Export saves your accept/reject decisions (not skips) as decisions.json for
<code>hqsam apply OUT --decisions decisions.json</code>; rows you leave undecided follow the policy.</p>
<ol id="queue"></ol>
<section id="skipped-section"><h2>Not shown</h2><ul id="skipped"></ul></section>
</main>
<script type="application/json" id="hqsam-data">{data}</script>
<script>{script}</script>
</body></html>
"""
