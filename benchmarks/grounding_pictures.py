"""Side-by-side grounding pictures of several trained models (and PLAN read both ways) on the same test phrases: one
row per phrase (the first test phrase of each finding category), one column per map, the true boxes in green.

    python -m benchmarks.grounding_pictures --data_dir runs/syn224 --out benchmarks/figures/grounding_maps.jpg \\
        --maps "PLAN=runs/grounding/plan_nowithin/seed0/train/model" \\
               "PLAN, last-stage regions=runs/grounding/plan_nowithin/seed0/train/model:regions" \\
               "global-only=runs/grounding/global/seed0/train/model:global"

A map is ``label=MODEL_DIR[:kind]``: kind ``local`` (default; the model's `get_grounding_maps`), ``regions`` (PLAN's
last-stage sparsified regions) or ``global`` (the global-embedding map, `eval.run`'s ``global`` row).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from plan_hf import PlanModel, PlanProcessor  # noqa: E402
from plan_hf.evaluation.data import find_ms_cxr_csv, grounding_items  # noqa: E402
from plan_hf.evaluation.grounding import dense_similarity_maps  # noqa: E402
from plan_hf.grounding import ground_phrases, render_heatmap  # noqa: E402
from plan_hf.metrics.grounding import pointing_game, signed_cnr  # noqa: E402


def maps_of(spec: str, items) -> tuple[str, list]:
    label, _, rest = spec.partition("=")
    folder, _, kind = rest.partition(":")
    model, processor = PlanModel.from_pretrained(folder).eval(), PlanProcessor.from_pretrained(folder)
    images, phrases = [item.image for item in items], [item.phrase for item in items]
    if kind == "global":
        return label, dense_similarity_maps(model, processor, images, phrases)
    if kind == "regions":  # the model's own grounding call with regions=True
        original = model.get_grounding_maps
        model.get_grounding_maps = lambda *args, **kwargs: original(*args, **kwargs, regions=True)
    return label, ground_phrases(model, processor, images, phrases)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--maps", nargs="+", required=True, help="label=MODEL_DIR[:local|regions|global]")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    items, seen = [], set()
    for item in grounding_items(find_ms_cxr_csv(args.data_dir), args.data_dir, args.split):
        if item.category not in seen:
            seen.add(item.category)
            items.append(item)
    columns = [maps_of(spec, items) for spec in args.maps]
    figure, axes = plt.subplots(len(items), len(columns), figsize=(2.6 * len(columns), 2.9 * len(items)),
                                squeeze=False)
    for row, item in enumerate(items):
        for column, (label, maps) in enumerate(columns):
            axis = axes[row, column]
            axis.axis("off")
            axis.imshow(render_heatmap(item.image, maps[row], item.boxes))
            hit = "hit" if pointing_game(maps[row], item.boxes) >= 0.5 else "miss"
            title = f"{label}\n{hit}, signed CNR {signed_cnr(maps[row], item.boxes):.2f}"
            if column == 0:
                title = "\n".join(textwrap.wrap(item.phrase, 30)[:2]) + "\n" + title
            axis.set_title(title, fontsize=7)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jpeg = {"pil_kwargs": {"quality": 80}} if args.out.suffix == ".jpg" else {}
    figure.savefig(args.out, dpi=70, bbox_inches="tight", **jpeg)
    plt.close(figure)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
