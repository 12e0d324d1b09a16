"""The evaluation report: `report.md` and a self-contained `report.html` beside `metrics.json`.

Both documents render the same sections (R@K/mAP global-only vs reranked, the effect of
the rerank, per-category R@1, a gallery of retrievals, R@1 and mAP of every evaluation of
the same rankings over time, counts and notes), so they can
never disagree. Figures are PNGs drawn with matplotlib's Agg renderer (no display, no
pyplot global state) and PIL; the Markdown links them as files written next to it, the
HTML embeds them as base64 data URIs so it can be mailed or archived as one file.
matplotlib is imported where a figure is drawn: `mga evaluate --help` does not wait for it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageOps

from pipelines import storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TILE = 128  # gallery thumbnail side, pixels
FRAME = 5  # coloured frame around each thumbnail
CAPTION = 16  # caption strip under each thumbnail
GAP = 6
QUERY_GAP = 24  # extra space between the query and its results
CAPTION_LINE = 14
HISTORY_ROWS = 10  # latest evaluations listed in the report's history table
COLOURS = {"query": (40, 90, 200), "match": (30, 160, 60), "miss": (210, 40, 40), "result": (150, 150, 150)}


@dataclass(frozen=True)
class GalleryExample:
    """One query and its top reranked results, with whether each is of the query's item
    (None: unknown, the query is unlabelled) and, optionally, a caption line under each."""

    query_id: str
    gallery_ids: tuple[str, ...]
    is_match: tuple[bool | None, ...]
    captions: tuple[str, ...] = ()


@dataclass
class Section:
    """A report section, rendered alike to Markdown and HTML."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # a bulleted list
    header: list[str] | None = None
    rows: list[list[str]] = field(default_factory=list)
    figure: str | None = None  # file name of a PNG in the figures mapping
    caption: str = ""


def fraction(value: float) -> str:
    """How every metric value is printed: a fraction with four decimals."""
    return f"{value:.4f}"


def recall_ks(metrics: Mapping[str, Any]) -> list[int]:
    """The K of every R@K in the metrics, ascending (metrics.json stores keys sorted as text)."""
    return sorted(int(name[2:]) for name in metrics["global"] if name.startswith("R@"))


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
    """The metric keys of an ordering: R@K by increasing K, then mAP."""
    return [f"R@{k}" for k in recall_ks(metrics)] + ["mAP"]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def recall_plot(metrics: Mapping[str, Any]) -> bytes:
    """R@K curves, global-only vs reranked, with mAP in the legend."""
    from matplotlib.figure import Figure

    ks = recall_ks(metrics)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for ordering, style in (("global", "o--"), ("reranked", "s-")):
        values = [metrics[ordering][f"R@{k}"] for k in ks]
        axes.plot(ks, values, style, label=f"{ordering} (mAP {fraction(metrics[ordering]['mAP'])})")
    axes.set_xlabel("K")
    axes.set_ylabel("R@K")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(ks)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"R@K at depth {metrics['depth']} ({metrics['queries']} queries)")
    return _png(figure)


def category_plot(metrics: Mapping[str, Any]) -> bytes:
    """Per-category R@(smallest K) bars, global-only vs reranked."""
    from matplotlib.figure import Figure

    k = recall_ks(metrics)[0]
    categories = list(metrics["per_category"])
    figure = Figure(figsize=(max(6.0, 0.6 * len(categories)), 4))
    axes = figure.subplots()
    positions = range(len(categories))
    width = 0.4
    for offset, ordering in ((-width / 2, "global"), (width / 2, "reranked")):
        values = [metrics["per_category"][name][f"{ordering}_R@{k}"] for name in categories]
        axes.bar([p + offset for p in positions], values, width, label=ordering)
    # "$" would start matplotlib mathtext in a category name.
    axes.set_xticks(list(positions), [name.replace("$", r"\$") for name in categories], rotation=30, ha="right")
    axes.set_ylabel(f"R@{k}")
    axes.set_ylim(0, 1.02)
    axes.legend()
    axes.set_title(f"R@{k} per query category")
    return _png(figure)


def _history_values(history: pa.Table, ordering: str, metric: str) -> list[float]:
    """One metric of one ordering per history row (NaN where that evaluation lacks it)."""
    values = pc.map_lookup(history.column(ordering), pa.scalar(metric), "first").to_pylist()
    return [math.nan if value is None else value for value in values]


def history_plot(history: pa.Table, metrics: Mapping[str, Any]) -> bytes:
    """R@(smallest K) and mAP of every evaluation in the history (pipelines.history), over time,
    global-only vs reranked; each point labelled with its rankings version."""
    from matplotlib.figure import Figure

    first = f"R@{recall_ks(metrics)[0]}"
    times = history.column("evaluated_at").to_pylist()
    versions = history.column("rankings_version").to_pylist()
    figure = Figure(figsize=(9, 3.6))
    for axes, metric in zip(figure.subplots(1, 2), (first, "mAP")):
        values = {ordering: _history_values(history, ordering, metric) for ordering in ("global", "reranked")}
        for ordering, style in (("global", "o--"), ("reranked", "s-")):
            axes.plot(times, values[ordering], style, label=ordering)
        for when, value, version in zip(times, values["reranked"], versions):
            axes.annotate(f"v{version}", (when, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        # Zoomed to the values, so a drop of a few points shows; never beyond [0, 1].
        shown = [v for series in values.values() for v in series if not math.isnan(v)] or [0.0, 1.0]
        axes.set_ylim(max(0.0, min(shown) - 0.05), min(1.0, max(shown) + 0.05) + 0.02)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
        axes.set_title(f"{metric} over time")
        axes.tick_params(axis="x", labelrotation=30)
    return _png(figure)


def _thumbnail(data: bytes | None, colour: tuple[int, int, int], captions: Sequence[str], lines: int = 1) -> Image.Image:
    """A framed tile with room for `lines` caption lines under it; an unreadable or missing
    image becomes a grey placeholder."""
    tile = Image.new("RGB", (TILE + 2 * FRAME, TILE + 2 * FRAME + CAPTION + (lines - 1) * CAPTION_LINE), "white")
    tile.paste(colour, (0, 0, TILE + 2 * FRAME, TILE + 2 * FRAME))
    try:
        picture = ImageOps.pad(Image.open(io.BytesIO(data)).convert("RGB"), (TILE, TILE), color="white")
    except Exception:  # noqa: BLE001 - missing bytes or any decoder failure: show a placeholder
        picture = Image.new("RGB", (TILE, TILE), (200, 200, 200))
        ImageDraw.Draw(picture).text((8, TILE // 2 - 6), "no image", fill="black")
    tile.paste(picture, (FRAME, FRAME))
    for line, caption in enumerate(captions[:lines]):
        ImageDraw.Draw(tile).text((2, TILE + 2 * FRAME + 2 + line * CAPTION_LINE), caption[:22], fill="black")
    return tile


def gallery_picture(examples: Sequence[GalleryExample], images: Mapping[str, bytes]) -> bytes:
    """One PNG, a row per example: the query (blue frame), then its top reranked results
    framed green (same item), red (other item) or grey (unknown: an unlabelled query), each
    captioned with its rank and id, and with the example's caption line when it has one."""
    columns = 1 + max(len(example.gallery_ids) for example in examples)
    lines = 2 if any(example.captions for example in examples) else 1
    tile_w, tile_h = TILE + 2 * FRAME, TILE + 2 * FRAME + CAPTION + (lines - 1) * CAPTION_LINE
    width = columns * (tile_w + GAP) + QUERY_GAP
    canvas = Image.new("RGB", (width, len(examples) * (tile_h + GAP) + GAP), "white")
    for row, example in enumerate(examples):
        y = GAP + row * (tile_h + GAP)
        name = posixpath.basename(example.query_id) or example.query_id  # a photo's file name, not its directory
        canvas.paste(_thumbnail(images.get(example.query_id), COLOURS["query"], [name], lines), (GAP, y))
        for rank, (gallery_id, match) in enumerate(zip(example.gallery_ids, example.is_match, strict=True), start=1):
            x = GAP + QUERY_GAP + rank * (tile_w + GAP)
            colour = COLOURS["result" if match is None else "match" if match else "miss"]
            captions = [f"{rank}. {gallery_id}", *example.captions[rank - 1:rank]]
            canvas.paste(_thumbnail(images.get(gallery_id), colour, captions, lines), (x, y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sections(metrics: Mapping[str, Any], figures: Mapping[str, bytes], history: pa.Table | None = None) -> list[Section]:
    """The report's content, independent of the output format; `history`: the metrics history's
    evaluations of these rankings (pipelines.history), this one included."""
    names = metric_names(metrics)
    summary = Section(
        "Summary",
        paragraphs=[
            f"Rankings: {metrics.get('rankings', 'unknown')}, version {metrics.get('rankings_version', 'unknown')}: "
            f"{metrics.get('rankings_rows', '?')} ranked rows (the first {metrics.get('rankings_depth', '?')} per query) and "
            f"{metrics.get('positives_rows', '?')} positives with their ranks over the whole gallery of {metrics.get('gallery', '?')} "
            f"(model {metrics.get('model_id') or 'unknown'}).",
            f"Evaluation depth {metrics['depth']}; rerank of the top {metrics['rerank_top']} "
            f"(alpha {metrics.get('alpha', 'unknown')}).",
            f"Queries evaluated: {metrics['queries']}; excluded (no gallery image of their item): "
            f"{metrics['excluded_queries']}; unlabelled (no item: ranked, not scored): {metrics.get('unlabelled_queries', 0)}.",
            "R@K: share of queries with a gallery image of their item among the first K. "
            "AP: (1/|P|) x sum of precision@k over the ranks k of matches, |P| = gallery images "
            "of the item; a positive below the depth counts as not retrieved.",
        ],
    )
    scores = Section(
        "R@K and mAP",
        header=["metric", "global only", "reranked", "change"],
        rows=[
            [
                name,
                fraction(metrics["global"][name]),
                fraction(metrics["reranked"][name]),
                f"{metrics['reranked'][name] - metrics['global'][name]:+.4f}",
            ]
            for name in names
        ],
        figure="recall.png",
        caption="R@K, global-only ranking vs reranked ranking",
    )
    effect = metrics["rerank_effect"]
    rerank = Section(
        "Effect of the rerank",
        paragraphs=[
            "By the rank of the first match, over queries with a gallery positive: "
            f"improved {fraction(effect['improved'])}, worsened {fraction(effect['worsened'])}, "
            f"unchanged {fraction(effect['unchanged'])}."
        ],
    )
    result = [summary, scores, rerank]
    if metrics["per_category"]:
        k = recall_ks(metrics)[0]
        result.append(
            Section(
                f"R@{k} per category",
                header=["category", "queries", f"global R@{k}", f"reranked R@{k}", "global mAP", "reranked mAP"],
                rows=[
                    [
                        name,
                        str(row["queries"]),
                        fraction(row[f"global_R@{k}"]),
                        fraction(row[f"reranked_R@{k}"]),
                        fraction(row["global_mAP"]),
                        fraction(row["reranked_mAP"]),
                    ]
                    for name, row in metrics["per_category"].items()
                ],
                figure="per_category.png",
                caption=f"R@{k} per query category",
            )
        )
    if "gallery.png" in figures:
        result.append(
            Section(
                "Gallery of retrievals",
                paragraphs=[
                    "Each row: the query (blue), then its top reranked results: green = same item, red = other item."
                ],
                figure="gallery.png",
                caption="query and top reranked results",
            )
        )
    if history is not None and history.num_rows:
        result.append(_history_section(history, metrics))
    if metrics.get("notes"):
        result.append(Section("Notes", items=list(metrics["notes"])))
    return result


def _history_section(history: pa.Table, metrics: Mapping[str, Any]) -> Section:
    """The evaluations of this rankings table so far (this one last): the plot and the latest rows."""
    first = f"R@{recall_ks(metrics)[0]}"
    shown = history.slice(max(0, history.num_rows - HISTORY_ROWS))
    columns = {name: shown.column(name).to_pylist() for name in ("evaluated_at", "rankings_version", "features_version", "model_id")}
    values = {(o, m): _history_values(shown, o, m) for o in ("global", "reranked") for m in (first, "mAP")}
    return Section(
        "History",
        paragraphs=[
            f"{history.num_rows} evaluations of {metrics.get('rankings')} at depth {metrics['depth']} in the metrics history "
            f"{metrics.get('history')}; the latest {shown.num_rows}:"
        ],
        header=["evaluated", "rankings version", "features version", "model", f"global {first}", f"reranked {first}", "global mAP", "reranked mAP"],
        rows=[
            [
                columns["evaluated_at"][i].strftime("%Y-%m-%d %H:%M"), str(columns["rankings_version"][i]), str(columns["features_version"][i]),
                str(columns["model_id"][i]), *(fraction(values[key][i]) for key in (("global", first), ("reranked", first), ("global", "mAP"), ("reranked", "mAP"))),
            ]
            for i in range(shown.num_rows)
        ],
        figure="history.png",
        caption=f"{first} and mAP of every evaluation of these rankings, by time (labels: rankings version)",
    )


def render_markdown(title: str, content: Sequence[Section]) -> str:
    def cells(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

    lines = [f"# {title}", ""]
    for section in content:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.items:
            lines += [f"- {item}" for item in section.items] + [""]
        if section.header:
            lines += [cells(section.header), cells(["---"] * len(section.header))]
            lines += [cells(row) for row in section.rows] + [""]
        if section.figure:
            lines += [f"![{section.caption}]({section.figure})", ""]
    return "\n".join(lines)


def render_html(title: str, content: Sequence[Section], figures: Mapping[str, bytes]) -> str:
    """A standalone page: inline CSS, figures as data URIs, every text escaped."""
    text = html.escape
    body = [f"<h1>{text(title)}</h1>"]
    for section in content:
        body.append(f"<h2>{text(section.title)}</h2>")
        body += [f"<p>{text(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.items:
            body.append("<ul>" + "".join(f"<li>{text(item)}</li>" for item in section.items) + "</ul>")
        if section.header:
            head = "".join(f"<th>{text(cell)}</th>" for cell in section.header)
            rows = "".join("<tr>" + "".join(f"<td>{text(cell)}</td>" for cell in row) + "</tr>" for row in section.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if section.figure and section.figure in figures:
            data = base64.b64encode(figures[section.figure]).decode("ascii")
            body.append(
                f'<figure><img alt="{text(section.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{text(section.caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%}figcaption{color:#666;font-size:90%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{text(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(out: storage.Location, metrics: Mapping[str, Any], gallery_png: bytes | None, history: pa.Table | None = None) -> list[str]:
    """Write the figures, `report.md` and `report.html` into `out`; returns the URIs written.

    `metrics` is the evaluate job's metrics.json content; the caller writes that file
    itself, after this, so a reader never finds a report without its metrics. `history`: the
    metrics history's evaluations of the same rankings, this one included (plotted).
    """
    figures = {"recall.png": recall_plot(metrics)}
    if metrics["per_category"]:
        figures["per_category.png"] = category_plot(metrics)
    if gallery_png is not None:
        figures["gallery.png"] = gallery_png
    if history is not None and history.num_rows:
        figures["history.png"] = history_plot(history, metrics)
    title = f"Retrieval evaluation: {metrics.get('model_id') or 'unknown model'}"
    content = sections(metrics, figures, history)
    documents = {
        "report.md": render_markdown(title, content).encode(),
        "report.html": render_html(title, content, figures).encode(),
    }
    written = []
    for name, data in {**figures, **documents}.items():
        target = out.join(name)
        target.write_bytes(data)
        written.append(target.uri)
    return written
