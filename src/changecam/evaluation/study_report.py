"""The attribution study's report: ``report.md`` with PNG plots, and the same to the loggers.

Every figure is drawn from the numbers of ``study.json``; nothing here computes a metric except
re-explaining the best and worst image of each architecture for its panels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from changecam.atomic import atomic_open, write_text
from changecam.data.transforms import image_to_tensor
from changecam.evaluation.attribution import changed_objects
from changecam.evaluation.study import RANDOM, StudyImage
from changecam.explain.hirescam import explain_batch
from changecam.explain.render import METHOD_TITLES, render_panel, save_panel
from changecam.explain.runner import pad_to_multiple
from changecam.models.protocol import size_multiple

TITLES = {**METHOD_TITLES, RANDOM: "random map"}
HEADLINE = (
    "date_accuracy",
    "date_accuracy_appeared",
    "date_accuracy_vanished",
    "causal_agreement",
    "causal_agreement_weighted",
)


def mean(entry: Mapping[str, Any] | None) -> float | None:
    return None if not entry else entry.get("mean")


def fmt(entry: Mapping[str, Any] | None, ci: bool = False) -> str:
    """``0.83 [0.71, 0.92]`` (or ``–`` when undefined)."""
    value = mean(entry)
    if value is None:
        return "–"
    if not ci or entry.get("ci95") is None or None in entry["ci95"]:
        return f"{value:.2f}"
    low, high = entry["ci95"]
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def forward_layers(result: Mapping[str, Any], method: str) -> list[str]:
    """A method's layers in forward order: as ``layer_order`` records them (``study.json`` is
    written with sorted keys, which put ``input`` last), else the results' own order."""
    layers = result["results"].get(method, {})
    return list(result.get("layer_order", {}).get(method) or layers)


def best_layer(
    layers: Mapping[str, Mapping[str, Any]],
    metric: str = "causal_agreement",
    order: Sequence[str] | None = None,
) -> str:
    """The layer with the highest ``metric`` (ties: the deepest, the last in forward order
    ``order``, default the mapping's)."""
    names = list(order or layers)
    scored = [(mean(layers[k].get(metric)) or -1.0, i, k) for i, k in enumerate(names)]
    return max(scored)[2]


def headline_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per architecture and method, at the method's layer with the best causal
    agreement (the full per-layer table follows it in the report)."""
    rows = []
    for arch, result in record["architectures"].items():
        for method, layers in result["results"].items():
            layer = best_layer(layers, order=forward_layers(result, method))
            entry = layers[layer]
            check = entry.get("randomisation") or {}
            rows.append(
                {
                    "architecture": arch,
                    "method": method,
                    "layer": layer,
                    **{m: entry.get(m) for m in (*HEADLINE, "pointing", "faithfulness_gap")},
                    "randomisation_final": check.get("final"),
                    "passes_randomisation": check.get("passes"),
                }
            )
    return rows


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots


def _per_architecture_axes(count: int) -> tuple[Figure, np.ndarray]:
    """One subplot per architecture, side by side, sharing the y axis."""
    figure, subplots = _figure(3.6 * count, 3.4)
    return figure, np.atleast_1d(subplots(1, count, sharey=True))


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png")
    return path


def plot_date_accuracy(record: Mapping[str, Any], path: Path) -> Path:
    """Bars with 95 % intervals: date accuracy and causal agreement per architecture × method."""
    rows = headline_rows(record)
    archs = list(record["architectures"])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, subplots = _figure(max(8, 1.6 * len(archs) * 2), 4.5)
    axes = subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, metric, title in zip(
        axes,
        ("date_accuracy", "causal_agreement"),
        ("date accuracy (known answer)", "agreement with the causal date"),
        strict=True,
    ):
        for j, method in enumerate(methods):
            values, errors = [], [[], []]
            for arch in archs:
                row = next(
                    (r for r in rows if r["architecture"] == arch and r["method"] == method), None
                )
                entry = row.get(metric) if row else None
                value = mean(entry)
                values.append(np.nan if value is None else value)
                ci = entry.get("ci95") if entry else None
                low, high = (
                    (ci if ci and None not in ci else (value, value))
                    if value is not None
                    else (np.nan, np.nan)
                )
                errors[0].append(0 if value is None else value - low)
                errors[1].append(0 if value is None else high - value)
            x = np.arange(len(archs)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, values, width, yerr=errors, capsize=2, label=TITLES.get(method, method))
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(archs)), archs, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    return _save(figure, path)


def plot_post_share(record: Mapping[str, Any], path: Path, methods: Sequence[str]) -> Path:
    """Post share per layer for each architecture (one subplot per method)."""
    figure, subplots = _figure(4.2 * len(methods), 3.6)
    axes = np.atleast_1d(subplots(1, len(methods), sharey=True))
    for ax, method in zip(axes, methods, strict=True):
        for arch, result in record["architectures"].items():
            layers = result["results"].get(method, {})
            names = forward_layers(result, method)
            values = [mean(layers[k].get("post_share")) for k in names]
            ax.plot(names, [np.nan if v is None else v for v in values], "o-", label=arch)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"post share, {TITLES.get(method, method)}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    axes[0].legend(fontsize=7)
    return _save(figure, path)


def plot_curves(record: Mapping[str, Any], path: Path) -> Path:
    """Deletion curves (``Σ S(k) / Σ|S(0)|`` over objects, both dates, each method's deepest
    layer) per architecture, each method beside its own random order (dashed, in its colour:
    each method's swaps edit the date its maps choose, so each has its own random baseline):
    the area between the two is the method's gap."""
    archs = list(record["architectures"])
    figure, axes = _per_architecture_axes(len(archs))
    for ax, arch in zip(axes, archs, strict=True):
        curves = record["architectures"][arch]["curves"]
        colours: dict[str, str] = {}
        for key, values in curves.items():
            method, layer, order = key.split("/")
            colour = colours.setdefault(f"{method}/{layer}", f"C{len(colours) % 10}")
            name = f"{TITLES.get(method, method)} ({layer})"
            label, style = (f"{name}, random order", "--") if order == "random" else (name, "-")
            ax.plot(np.linspace(0, 1, len(values)), values, style, color=colour, label=label)
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("fraction swapped", fontsize=8)
    axes[0].set_ylabel("Σ S / Σ |S(0)|")
    axes[0].legend(fontsize=6)
    return _save(figure, path)


def plot_randomisation(record: Mapping[str, Any], path: Path) -> Path:
    """Mean |Spearman| to the trained maps along the cascade (each method's deepest layer)."""
    archs = list(record["architectures"])
    figure, axes = _per_architecture_axes(len(archs))
    for ax, arch in zip(axes, archs, strict=True):
        result = record["architectures"][arch]
        for method, layers in result["results"].items():
            layer = forward_layers(result, method)[-1]
            check = layers[layer].get("randomisation")
            if not check:
                continue
            x = [n / check["of"] for n in check["layers_randomised"]]
            y = [np.nan if v is None else v for v in check["spearman"]]
            ax.plot(x, y, "o-", label=f"{TITLES.get(method, method)} ({layer})")
            ax.axhline(check["pass_spearman"], color="grey", lw=0.8, ls="--")
        ax.set_ylim(-0.3, 1.05)
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("share of layers re-initialised (head first)", fontsize=8)
    axes[0].set_ylabel("mean |Spearman| to trained map")
    axes[0].legend(fontsize=6)
    return _save(figure, path)


def panels(
    output_dir: Path,
    record: Mapping[str, Any],
    images: Sequence[StudyImage],
    models: Mapping[str, Callable[[], torch.nn.Module]],
    device: torch.device | str,
) -> dict[str, dict[str, Path]]:
    """For each architecture, its best method and layer (causal agreement) drawn on the image
    where it agrees most and least with the causal date (target: every changed object)."""
    by_name = {img.name: img for img in images}
    out: dict[str, dict[str, Path]] = {}
    for arch, result in record["architectures"].items():
        candidates = {k: v for k, v in result["results"].items() if k != RANDOM and v}
        if not candidates:
            continue
        method = max(
            candidates,
            key=lambda m: (
                mean(candidates[m][best_layer(candidates[m])].get("causal_agreement")) or -1
            ),
        )
        layer = best_layer(candidates[method])
        per_image = {
            k: v
            for k, v in result["per_image"].get(f"{method}/{layer}", {}).items()
            if v is not None
        }
        if not per_image:
            continue
        net = models[arch]()  # the network, loaded by the command
        net = net.to(device).eval()
        out[arch] = {}
        for which, name in (
            ("best", max(per_image, key=per_image.get)),
            ("worst", min(per_image, key=per_image.get)),
        ):
            img = by_name[name]
            union = np.zeros(img.label.shape, bool)
            for obj in changed_objects(img.label, img.change_type, record["settings"]["dilation"]):
                union |= obj.region
            multiple = size_multiple(net)
            pre = pad_to_multiple(image_to_tensor(img.pre)[None], multiple).to(device)
            post = pad_to_multiple(image_to_tensor(img.post)[None], multiple).to(device)
            roi = torch.zeros(1, 1, *pre.shape[-2:])
            roi[0, 0, : union.shape[0], : union.shape[1]] = torch.from_numpy(union)
            exp = (
                explain_batch(
                    net, pre, post, taps=[layer], target="roi", roi=roi.to(device), methods=[method]
                )
                .crop(*img.label.shape)
                .to("cpu")
            )
            panel = render_panel(
                img.pre,
                img.post,
                exp,
                label=img.label,
                layer=layer,
                method=method,
                title=f"{arch}: {which} image {name} ({TITLES.get(method, method)}, {layer}; "
                f"causal agreement {per_image[name]:.2f})",
                dpi=50,
            )
            path = output_dir / "plots" / f"panel_{arch}_{which}.png"
            save_panel(panel, path)
            out[arch][which] = path
    return out


def report_markdown(record: Mapping[str, Any], plots: Mapping[str, Any]) -> str:
    """The report: data, headline table, per-architecture answers, per-layer tables, plots."""
    data = record["data"]
    context = record["settings"]["context"]
    window = "the whole image" if context is None else f"a {context}² window"
    lines = [
        "# Does the model look at the right date?",
        "",
        f"Split `{data['split']}` of `{data['root']}` ({data['images']} images). Each labelled "
        f"changed object, dilated by {record['settings']['dilation']} px, is explained on its "
        f"own (target: the logits summed inside it) in {window}. Intervals: 95 % bootstrap over "
        "images. Random baseline 0.5.",
        "",
        "## Headline (each method at its layer with the best causal agreement)",
        "",
        "| architecture | method | layer | date accuracy | appeared | vanished | causal agreement "
        "| margin-weighted | pointing | faithfulness gap | randomisation ρ (passes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in headline_rows(record):
        rho = row["randomisation_final"]
        passes = row["passes_randomisation"]
        lines.append(
            f"| {row['architecture']} | {row['method']} | {row['layer']} | "
            f"{fmt(row['date_accuracy'], True)} | {fmt(row['date_accuracy_appeared'])} | "
            f"{fmt(row['date_accuracy_vanished'])} | {fmt(row['causal_agreement'], True)} | "
            f"{fmt(row['causal_agreement_weighted'], True)} | "
            f"{fmt(row['pointing'])} | {fmt(row['faithfulness_gap'])} | "
            + ("–" if rho is None else f"{rho:.2f} ({'yes' if passes else 'NO'})")
            + " |"
        )
    lines += ["", "## What each model uses", ""]
    for arch, result in record["architectures"].items():
        lines.append(f"- **{arch}**: " + answer(arch, result))
    for key, title in (
        ("date_accuracy", "date accuracy"),
        ("post_share", "post share"),
        ("curves", "deletion curves"),
        ("randomisation", "randomisation check"),
    ):
        if key in plots:
            lines += ["", f"![{title}]({Path(plots[key]).relative_to(plots['_root'])})"]
    for arch, result in record["architectures"].items():
        lines += ["", f"## {arch}", "", _layer_table(result)]
        for which, path in plots.get("panels", {}).get(arch, {}).items():
            lines += ["", f"![{arch} {which}]({Path(path).relative_to(plots['_root'])})"]
        if result.get("skipped"):
            lines += [""] + [f"- {k} skipped: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def answer(arch: str, result: Mapping[str, Any]) -> str:
    """A plain sentence: which date the model uses, whether it is right, which methods pass."""
    causal = result["causal"]
    post = mean(causal.get("causal_post"))
    parts = []
    if post is not None:
        parts.append(f"its score depends more on the post date for {post:.0%} of the objects")
    appeared = mean(causal.get("model_date_accuracy_appeared"))
    vanished = mean(causal.get("model_date_accuracy_vanished"))
    if appeared is not None and vanished is not None:
        parts.append(
            f"that causal date is the one holding the evidence for {appeared:.0%} of appeared "
            f"and {vanished:.0%} of vanished buildings"
        )
    near_tie = mean(causal.get("causal_near_tie"))
    if near_tie is not None and causal.get("causal_margin_median") is not None:
        parts.append(
            f"for {near_tie:.0%} of the objects the two swaps move the score within 5 % of each "
            f"other (median causal margin {causal['causal_margin_median']:.1%})"
        )
    rows = [r for r in headline_rows({"architectures": {arch: result}}) if r["method"] != RANDOM]
    best = max(rows, key=lambda r: mean(r["causal_agreement"]) or -1, default=None)
    if best is not None:
        parts.append(
            f"the explanation that agrees best with it is {TITLES.get(best['method'], best['method'])} "
            f"at {best['layer']} ({fmt(best['causal_agreement'], True)})"
        )
    weighted = [
        (mean(entry.get("causal_agreement_weighted")), method, layer, entry)
        for method, layers in result["results"].items()
        if method != RANDOM
        for layer, entry in ((k, layers[k]) for k in forward_layers(result, method))
        if mean(entry.get("causal_agreement_weighted")) is not None
    ]
    if weighted:
        _, method, layer, entry = max(weighted, key=lambda w: w[0])
        parts.append(
            f"weighed by the causal margin, the best is {TITLES.get(method, method)} at {layer} "
            f"({fmt(entry['causal_agreement_weighted'], True)})"
        )
    passing = sorted({r["method"] for r in rows if r["passes_randomisation"]})
    failing = sorted({r["method"] for r in rows if r["passes_randomisation"] is False})
    if passing or failing:
        parts.append(
            "randomisation check passed by "
            + (", ".join(passing) or "none")
            + ("; failed by " + ", ".join(failing) if failing else "")
        )
    if not parts:  # nothing to say a sentence about
        studied = sum(result.get("objects", {}).values())
        images = result.get("images")
        return (
            f"no changed object was scored ({studied} objects in {images} images): nothing to "
            "say about this model; study a split with change, or more images"
        )
    return "; ".join(parts) + "."


def _layer_table(result: Mapping[str, Any]) -> str:
    lines = [
        "| method | layer | date acc. | appeared | vanished | causal agr. | weighted | pointing "
        "| post share | gap | ρ random. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, layers in result["results"].items():
        for layer in forward_layers(result, method):
            e = layers[layer]
            rho = (e.get("randomisation") or {}).get("final")
            lines.append(
                f"| {method} | {layer} | {fmt(e.get('date_accuracy'))} | "
                f"{fmt(e.get('date_accuracy_appeared'))} | {fmt(e.get('date_accuracy_vanished'))} | "
                f"{fmt(e.get('causal_agreement'))} | {fmt(e.get('causal_agreement_weighted'))} | "
                f"{fmt(e.get('pointing'))} | "
                f"{fmt(e.get('post_share'))} | {fmt(e.get('faithfulness_gap'))} | "
                + ("–" if rho is None else f"{rho:.2f}")
                + " |"
            )
    return "\n".join(lines)


def write_report(
    output_dir: Path,
    record: Mapping[str, Any],
    images: Sequence[StudyImage],
    models: Mapping[str, Callable[[], torch.nn.Module]],
    device: torch.device | str,
) -> dict[str, Any]:
    """Write the plots and ``report.md``; return the plot paths (``_root``: ``output_dir``)."""
    plot_dir = output_dir / "plots"
    methods = [
        m
        for m in ("hirescam", "contrastive")
        if any(m in r["results"] for r in record["architectures"].values())
    ]
    plots: dict[str, Any] = {
        "_root": output_dir,
        "date_accuracy": plot_date_accuracy(record, plot_dir / "date_accuracy.png"),
        "post_share": plot_post_share(record, plot_dir / "post_share.png", methods or ["hirescam"]),
    }
    if any(r["curves"] for r in record["architectures"].values()):
        plots["curves"] = plot_curves(record, plot_dir / "deletion_curves.png")
    if any(
        "randomisation" in e
        for r in record["architectures"].values()
        for layers in r["results"].values()
        for e in layers.values()
    ):
        plots["randomisation"] = plot_randomisation(record, plot_dir / "randomisation.png")
    plots["panels"] = panels(output_dir, record, images, models, device)
    write_text(output_dir / "report.md", report_markdown(record, plots))
    return plots


def log_study(loggers: Sequence[Any], record: Mapping[str, Any], plots: Mapping[str, Any]) -> None:
    """The headline table and plots to each logger: a W&B ``Table`` and images for W&B, the
    headline numbers as metrics for the others."""
    rows = headline_rows(record)
    columns = [
        "architecture",
        "method",
        "layer",
        *HEADLINE,
        "pointing",
        "faithfulness_gap",
        "randomisation_final",
        "passes_randomisation",
    ]
    table = [[_cell(r[c]) for c in columns] for r in rows]
    images = {k: v for k, v in plots.items() if k not in ("_root", "panels")}
    for arch, pair in plots.get("panels", {}).items():
        images.update({f"panel_{arch}_{w}": p for w, p in pair.items()})
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_table("study/headline", columns=columns, data=table)
            for key, path in images.items():
                logger.log_image(f"study/{key}", images=[str(path)])
        else:
            flat = {}
            for r in rows:
                for metric in (*HEADLINE, "pointing", "faithfulness_gap"):
                    value = _cell(r[metric])
                    if isinstance(value, float) and not math.isnan(value):
                        key = f"study/{r['architecture']}/{r['method']}/{r['layer']}/{metric}"
                        flat[key] = value
            logger.log_metrics(flat)
        logger.save()


def _cell(value: Any) -> Any:
    if isinstance(value, Mapping):
        return float("nan") if value.get("mean") is None else float(value["mean"])
    return value
