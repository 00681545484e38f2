"""``report.html``: one self-contained page (tables, plots and images inline) that a radiologist can read.

Every number comes from the metrics dict that ``evaluate`` returned and ``metrics.json`` holds; the page only
lays it out and says, next to each number, which way is better and what to compare it with.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from medsyn.metrics.image_statistics import STATISTICS
from medsyn.output_files import write_text_atomically

from .image_sets import ImageSet

GRID_IMAGES = 16
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #7a4b00; } .pass { color: #1a7f37; font-weight: bold; } .fail { color: #b42318; font-weight: bold; }
img { image-rendering: pixelated; max-width: 100%; } figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _png(figure_or_array) -> str:
    """An <img> with the PNG inline: a matplotlib figure, or a uint8 image array."""
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(figure_or_array).save(buffer, format="PNG")
    else:
        import matplotlib.pyplot as plt

        figure_or_array.savefig(buffer, format="PNG", dpi=110, bbox_inches="tight")
        plt.close(figure_or_array)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _grid(images: np.ndarray, columns: int = 8, zoom: int = 1) -> np.ndarray:
    """Images (N, H, W[, C]) tiled into one array, with a 2-pixel white gutter."""
    rows = -(-len(images) // columns)
    height, width = images.shape[1:3]
    shape = (rows * (height + 2), columns * (width + 2)) + images.shape[3:]
    canvas = np.full(shape, 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (height + 2) : r * (height + 2) + height, c * (width + 2) : c * (width + 2) + width] = image
    return canvas.repeat(zoom, 0).repeat(zoom, 1) if zoom > 1 else canvas


def _zoom_for(size: int) -> int:
    return max(1, 96 // size)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


FEATURE_ROWS = [
    ("fid", "FID", "lower is better"),
    ("half_size_fid", "FID, generated vs half the real set", "compare with the next row, measured at the same sizes"),
    ("real_halves_fid", "FID, real half vs the other real half",
     "what two samples of the real images score at this size; not comparable with FID on all images, which is "
     "lower because FID falls as images are added"),
    ("kid_mean", "KID (mean over subsets)", "lower is better; ~0 for the same distribution"),
    ("kid_std", "KID (std over subsets)", "how much KID moves between random subsets"),
    ("kid_subset_size", "KID subset size", ""),
    ("precision", "precision (k = {k})", "share of generated images that look real (higher is better)"),
    ("recall", "recall (k = {k})", "share of the real variety the generator covers (higher is better)"),
    ("density", "density (k = {k_density})", "~1 when generated images sit where real ones are dense"),
    ("coverage", "coverage (k = {k_density})", "share of real images with a generated neighbour (higher is better)"),
]


def _feature_table(section: dict, title: str) -> str:
    if "note" in section:
        return f"<h3>{title}</h3>" + _note(section["note"])
    rows = [[label.format(k=section.get("k"), k_density=section.get("k_density")), section.get(key), meaning]
            for key, label, meaning in FEATURE_ROWS]
    if "inception_score" in section:
        score = section["inception_score"]
        rows.append(["Inception Score", None if score is None else f"{score[0]:.3f} ± {score[1]:.3f}",
                     section.get("inception_score_note", "higher is better")])
    return f"<h3>{title}</h3>" + _table(["metric", "value", "how to read it"], rows)


def _spectrum_plot(spectrum: dict) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    frequency = np.asarray(spectrum["frequency"])
    for name in ("real", "generated"):
        axis.semilogy(frequency[1:], np.asarray(spectrum[name])[1:], label=name)
    axis.set_xlabel("spatial frequency (cycles / pixel)")
    axis.set_ylabel("mean power")
    axis.set_title("Radial power spectrum")
    axis.legend()
    return _png(figure)


def _histogram_plot(audit: dict, title: str) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    edges = np.asarray(audit["histogram_edges"])
    axis.bar(edges[:-1], audit["histogram_counts"], width=np.diff(edges), align="edge", color="#4c78a8")
    axis.axvline(audit["threshold"], color="#b42318", linestyle="--", label=f"threshold {audit['threshold']:.4g}")
    axis.set_xlabel("distance to the nearest training image")
    axis.set_ylabel("generated images")
    axis.set_title(title)
    axis.legend()
    return _png(figure)


def _score_error_plot(section: dict) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.semilogx(section["sigma"], section["relative_dsm_error"], marker="o", markersize=3)
    axis.set_xlabel("noise level sigma")
    axis.set_ylabel("relative DSM error")
    axis.set_title(f"Score error on {section['images']} {section['images_from']} images")
    return _png(figure)


def _privacy_html(section: dict, output_dir: Path, flagged: list[str]) -> str:
    if "note" in section:
        return _note(section["note"])
    parts = []
    spaces = {"structure": "image structure (relative distance: noise, blur, intensity, moves, mirrors discounted)",
              "pixels": "pixel space (RMS difference on [0, 1])"}
    image_title = spaces.get(section.get("images", {}).get("space"), "images")
    for key, title in (("images", image_title), ("domain_features", "domain features"),
                       ("clip_features", "open_clip image features")):
        audit = section.get(key, {})
        if "note" in audit:
            parts.append(f"<h3>Audit in {title}</h3>" + _note(audit["note"]))
            continue
        verdict = '<span class="pass">passed</span>' if audit["passed"] else '<span class="fail">failed</span>'
        parts.append(f"<h3>Audit in {title}: {verdict}</h3><p>{html.escape(audit['verdict'])}</p>")
        parts.append(_table(["", "value"], [
            ["near-copies (always a failure)", f"{audit['num_near_copies']} within {audit['copy_distance']:g}"],
            ["flagged (below the threshold)", audit["num_flagged"]],
            ["flagged expected of fresh images", audit["expected_flagged"]],
            ["p-value of the flagged count", audit["flagged_p_value"]],
            ["data-copying Z_U (0: like held-out images)", audit["data_copying_z"]],
            ["data-copying p-value", audit["data_copying_p_value"]],
            ["alpha (both tests together)", audit["alpha"]],
            ["threshold", audit["threshold"]], ["threshold from", audit["threshold_source"]],
            ["held-out images used / excluded as near-copies of training images",
             f"{audit['held_out_used']} / {audit['held_out_duplicates_excluded']}"],
            ["closest generated-to-training distance", audit["min_distance"]],
            ["generated images (all audited)", audit["num_generated"]], ["training images", audit["num_train"]],
            ["seconds", audit["seconds"]],
        ]))
        parts.append(_histogram_plot(audit, f"Nearest training image, {title}"))
    if flagged:
        from PIL import Image

        parts.append(f"<h3>Flagged images beside their nearest training images (first {min(len(flagged), 20)} of {len(flagged)})</h3>")
        for name in flagged[:20]:
            pair = np.asarray(Image.open(output_dir / name))
            zoom = _zoom_for(pair.shape[0])
            parts.append(f"<figure>{_png(pair.repeat(zoom, 0).repeat(zoom, 1))}"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    return "".join(parts)


def roc_figure(fpr, tpr, label: str):
    """A membership attack's ROC curve against chance, as a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(fpr, tpr, label=label)
    axis.plot([0, 1], [0, 1], "k:", label="chance")
    axis.set(xlabel="false-positive rate (non-members called members)", ylabel="true-positive rate",
             title="membership inference ROC")
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _membership_html(section: dict) -> str:
    import matplotlib.pyplot as plt

    figure = roc_figure(section["roc"]["fpr"], section["roc"]["tpr"], f"{section['method']} attack")
    plot = _png(figure)
    plt.close(figure)
    rows = [["ROC AUC (0.5: chance)", section["auc"], f"[{section['auc_ci'][0]:.3f}, {section['auc_ci'][1]:.3f}]"],
            ["TPR at 1% FPR", section["tpr_at_1pct_fpr"],
             f"[{section['tpr_at_1pct_fpr_ci'][0]:.3f}, {section['tpr_at_1pct_fpr_ci'][1]:.3f}]"],
            ["TPR at 0.1% FPR", section["tpr_at_0_1pct_fpr"],
             f"[{section['tpr_at_0_1pct_fpr_ci'][0]:.3f}, {section['tpr_at_0_1pct_fpr_ci'][1]:.3f}]"]]
    return (f"<p>The {html.escape(section['method'])} attack on the model itself: {section['members']} images of "
            f"--{html.escape(section['members_from'])} (members) against {section['non_members']} of "
            f"--{html.escape(section['non_members_from'])} (non-members). TPR at low FPR is the share of training "
            "patients exposed when almost no outsider is falsely accused. A low AUC says this attack fails on this "
            "model, not that every attack will; only differentially private training bounds them all.</p>"
            + _table(["measure", "value", "95% bootstrap CI"], rows) + f"<figure>{plot}</figure>")


def _prompt_adherence_html(section: dict) -> str:
    if "note" in section:
        return _note(section["note"])
    parts = [f"<p>CLIPScore (Hessel et al.: {section['clip_score_weight']} × max(cosine, 0)) of each image with its "
             "class's prompt, and prompt retrieval: the share of images whose own prompt is the closest of all the "
             "class prompts. Real images show what the encoder can read off these scans at all.</p>"]
    rows = []
    for name, prompt in section["prompts"].items():
        row = [name, prompt]
        for which in ("generated", "real"):
            cell = section.get(which, {}).get("per_class", {}).get(name, {})
            row += [cell.get("clip_score"), cell.get("retrieval_accuracy")]
        rows.append(row)
    rows.append(["all", "", *[section.get(w, {}).get(m) for w in ("generated", "real")
                              for m in ("clip_score", "retrieval_accuracy")]])
    parts.append(_table(["class", "prompt", "generated CLIPScore", "generated retrieval", "real CLIPScore",
                         "real retrieval"], rows))
    return "".join(parts)


def _samples_html(real: ImageSet, generated: ImageSet) -> str:
    zoom = _zoom_for(real.images.shape[-1])
    parts = []
    names = generated.class_names if generated.labels is not None and real.labels is not None else None
    groups = [(name, i) for i, name in enumerate(names)] if names else [("all", None)]
    for group, index in groups:
        row = []
        for image_set in (real, generated):
            members = np.arange(len(image_set)) if index is None else np.flatnonzero(image_set.labels == index)
            if len(members):
                grid = _grid(image_set.as_hwc()[members[:GRID_IMAGES]], zoom=zoom)
                row.append(f"<figure>{_png(grid)}<figcaption>{image_set.name}, {html.escape(group)}"
                           f" (first {min(len(members), GRID_IMAGES)} of {len(members)})</figcaption></figure>")
        parts.append("".join(row))
    return "".join(parts)


def write_report(metrics: dict, real: ImageSet, generated: ImageSet, output_dir: str | Path) -> Path:
    """Write ``report.html`` into ``output_dir`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    output_dir = Path(output_dir)
    inputs = metrics["inputs"]
    sections = [
        "<h1>medsyn evaluation report</h1>",
        "<h2>Inputs</h2>",
        _table(["set", "source", "images", "channels × height × width", "per class"], [
            [name, info["source"], info["count"], " × ".join(map(str, info["shape"])),
             ", ".join(f"{k}: {v}" for k, v in (info["per_class"] or {}).items()) or None]
            for name, info in inputs.items()
        ]),
        "<h2>Samples</h2>", _samples_html(real, generated),
        "<h2>Fidelity and variety</h2>",
        "<p>ImageNet Inception features are weak on grayscale medical images; the domain encoder's numbers "
        "are the ones that reflect what a model of these images sees. Both are reported.</p>",
        _feature_table(metrics["inception"], "Inception (pt_inception-2015-12-05 pool3)"),
        _feature_table(metrics["domain"], "Domain encoder"),
        _feature_table(metrics.get("clip", {"note": "not computed"}), "open_clip image tower"),
        "<h2>Prompt adherence</h2>", _prompt_adherence_html(metrics.get("prompt_adherence", {"note": "not run"})),
    ]
    diversity = metrics["diversity"]
    rows = [["all images", diversity["overall"]["real"], diversity["overall"]["generated"]]]
    rows += [[name, row.get("real"), row.get("generated")] for name, row in diversity.get("per_class", {}).items()]
    sections += [
        f"<h2>Diversity</h2><p>{html.escape(diversity['metric'])}, {diversity['scales']} scales. "
        "Generated images much more alike than real ones (a higher value) suggest mode collapse.</p>",
        _table(["", "real", "generated"], rows),
    ]
    statistics = metrics["image_statistics"]
    sections += [
        "<h2>Image statistics</h2>",
        _table(["statistic", "real mean", "real std", "generated mean", "generated std"], [
            [name, statistics[name]["real"]["mean"], statistics[name]["real"]["std"],
             statistics[name]["generated"]["mean"], statistics[name]["generated"]["std"]]
            for name in STATISTICS
        ]),
        _spectrum_plot(statistics["radial_power_spectrum"]),
    ]
    worst = metrics.get("least_realistic", {})
    if worst:
        sections.append("<h2>Least realistic generated images</h2><p>Lowest realism score (distance to the real "
                        "manifold in feature space): where to look first for artefacts.</p>")
        zoom = _zoom_for(generated.images.shape[-1])
        for name, indices in worst.items():
            grid = _grid(generated.as_hwc()[indices], zoom=zoom)
            sections.append(f"<figure>{_png(grid)}<figcaption>{html.escape(name)}: generated images "
                            f"{', '.join(map(str, indices))}</figcaption></figure>")
    sections += ["<h2>Privacy: memorisation audit</h2>",
                 _privacy_html(metrics["privacy"], output_dir, metrics.get("flagged_pair_images", []))]
    if "membership" in metrics:
        sections += ["<h2>Privacy: membership inference</h2>", _membership_html(metrics["membership"])]
    if "score_error" in metrics:
        sections += ["<h2>Score model error per noise level</h2><p>Denoising score-matching error on held-out "
                     "images relative to a model that knows nothing (1); 0 is perfect.</p>",
                     _score_error_plot(metrics["score_error"])]
    if "downstream" in metrics:
        sections += ["<h2>Downstream utility</h2>", _downstream_html(metrics["downstream"])]
    sections.append(f"<p><small>Computed in {metrics['seconds']} s; every number is in metrics.json.</small></p>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>medsyn evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    path = output_dir / "report.html"
    write_text_atomically(path, page)
    return path


def _downstream_html(section: dict) -> str:
    if "note" in section:
        return _note(section["note"])
    rows = [[name, run["auc"], f"[{run['auc_ci'][0]:.3f}, {run['auc_ci'][1]:.3f}]", run["train_images"]]
            for name, run in section["runs"].items()]
    low, high = section["auc_gain_ci"]
    verdict = ("helped" if low > 0 else "hurt" if high < 0 else "made no difference beyond resampling noise")
    return (f"<p>{html.escape(section['description'])}</p>"
            + _table(["classifier trained on", "test ROC AUC", "95% bootstrap CI", "training images"], rows)
            + f"<p>AUC change from adding synthetic images: {section['auc_gain']:+.3f} "
            f"(95% CI [{low:+.3f}, {high:+.3f}]): the synthetic images {verdict}.</p>")
