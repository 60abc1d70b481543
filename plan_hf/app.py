"""The grounding app: upload a chest X-ray (PNG, JPEG or DICOM), type phrases, see where the model puts each of them,
the zero-shot scores of a list of findings and the closest reports of a small gallery.

Everything the page shows is computed by `GroundingApp`, plain Python that is tested without a browser; Gradio is only
imported by `build_demo` and `main` (it lives in the optional ``app`` extra). `app.py` at the repository root is the
entry point (`python -m app --model DIR_OR_HUB_ID`, or a Hugging Face Space).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .evaluation.data import ImageSet, mimic_image_set
from .evaluation.embed import embed_images, embed_texts, logit_scale
from .evaluation.zero_shot import binary_probabilities, class_embeddings
from .grounding import ground_phrases, render_heatmap
from .image_processing_plan import load_image
from .prompts import (
    NEGATIVE_TEMPLATES,
    NORMAL_SENTENCES,
    POSITIVE_DESCRIPTIONS,
    POSITIVE_TEMPLATES,
    ClassPrompts,
    class_prompts,
    expand_templates,
)

logger = logging.getLogger(__name__)

DEFAULT_FINDINGS: tuple[str, ...] = tuple(POSITIVE_DESCRIPTIONS)  # the findings with report-style phrasings
DEFAULT_PHRASES = "right lower lobe consolidation\nleft pleural effusion"
MAX_UPLOAD_BYTES = 64 * 2**20  # a CR/DX chest film is 5-30 MB; larger is not one X-ray
MAX_PIXELS = 50_000_000  # ~7000 x 7000: beyond any detector, and the grey copy alone would take 200 MB
MAX_PHRASES = 8
NUM_MATCHES = 5
# The demo's layout (`training.demo --out D`): the model in D/run/model, the synthetic set in D/data.
DEMO_DATA_FROM_MODEL = Path("..", "..", "data")
_SPLIT = re.compile(r"[\n;]")


class InputError(ValueError):
    """A bad input; its message is written for the page."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def split_entries(text: str | None) -> list[str]:
    """One entry per line or per ';', stripped, empty ones dropped, duplicates dropped (order kept)."""
    return list(dict.fromkeys(part.strip() for part in _SPLIT.split(text or "") if part.strip()))


def parse_phrases(text: str | None, max_phrases: int = MAX_PHRASES) -> list[str]:
    phrases = split_entries(text)
    if not phrases:
        raise InputError("Type at least one phrase to ground (one per line, or separated by ';').")
    if len(phrases) > max_phrases:
        raise InputError(f"{len(phrases)} phrases given; at most {max_phrases} are grounded at once.")
    return phrases


def read_upload(path: str | os.PathLike | None, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The uploaded file as float32 (H, W) in [0, 1] (`load_image`: 8/16-bit, DICOM with MONOCHROME1 inverted)."""
    if path is None:
        raise InputError("Upload a chest X-ray first (PNG, JPEG or DICOM).")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: the upload did not arrive; please upload it again.")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    if size == 0:
        raise InputError(f"{path.name} is empty.")
    try:  # PIL's decompression-bomb guard bounds what a small compressed file can expand to
        grey = load_image(path)
    except ValueError as err:
        raise InputError(f"{path.name} is not a readable PNG, JPEG or DICOM image: {_reason(err, path)}") from err
    if grey.size > max_pixels:
        raise InputError(f"{path.name} has {grey.shape[1]} x {grey.shape[0]} pixels; the limit is {max_pixels:,}.")
    return grey


def _reason(err: ValueError, path: Path) -> str:
    """The loader's message without the (temporary, server-side) path it starts with."""
    return str(err).replace(f"{path}: ", "").replace(str(path), path.name)


# --------------------------------------------------------------------------------------------------------------------
# Grounding pictures
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Grounding:
    phrase: str
    heatmap: np.ndarray  # float32 (H, W) over the original image, a distribution over its pixels
    peak: tuple[int, int]  # (row, column) of its maximum


def peak_position(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of the heat map's maximum (NaN, where the model saw nothing, ignored)."""
    row, column = np.unravel_index(np.nanargmax(heatmap), heatmap.shape)
    return int(row), int(column)


def mark_peak(picture: Image.Image, peak: tuple[int, int]) -> Image.Image:
    """A white ring with a black rim and a cross-hair around `peak`, sized to the picture so it shows at any scale."""
    row, column = peak
    radius = max(4, round(max(picture.size) / 30))
    width = max(1, radius // 4)
    draw = ImageDraw.Draw(picture)
    for colour, grow in (((0, 0, 0), width), ((255, 255, 255), 0)):
        draw.ellipse([column - radius - grow, row - radius - grow, column + radius + grow, row + radius + grow],
                     outline=colour, width=width + 2 * grow)
    for colour, grow in (((0, 0, 0), width), ((255, 255, 255), 0)):
        draw.line([column - radius // 2, row, column + radius // 2, row], fill=colour, width=width + grow)
        draw.line([column, row - radius // 2, column, row + radius // 2], fill=colour, width=width + grow)
    return picture


def overlay(grey: np.ndarray, grounding: Grounding, alpha: float) -> Image.Image:
    """The X-ray with the phrase's heat map blended at opacity `alpha` and its peak marked; the X-ray's own size."""
    return mark_peak(render_heatmap(grey, grounding.heatmap, alpha=float(alpha)), grounding.peak)


def grey_picture(grey: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------------
# Zero-shot findings and the report gallery
# --------------------------------------------------------------------------------------------------------------------
def finding_prompts(name: str) -> ClassPrompts:
    """The package's prompt set of a known finding; the same templates around the typed name for any other."""
    if name in POSITIVE_DESCRIPTIONS:
        return class_prompts(name)
    described = name.lower()
    return ClassPrompts(name=name, positive=expand_templates(POSITIVE_TEMPLATES, [described]),
                        negative=expand_templates(NEGATIVE_TEMPLATES, [described]) + NORMAL_SENTENCES)


@dataclass
class Match:
    rank: int
    similarity: float  # cosine between the upload's and the report's global embeddings
    report_id: str
    report: str
    image: Any  # the gallery image the report belongs to (a path or what the set holds)


@dataclass
class ReportGallery:
    """Reports (with their images) whose text embeddings are computed once, when the gallery is built."""

    reports: ImageSet
    text_embeds: np.ndarray  # (N, d) L2-normalised

    @classmethod
    def embed(cls, model, processor, reports: ImageSet, batch_size: int = 32) -> "ReportGallery":
        if not reports.texts:
            raise ValueError("the gallery has no reports")
        return cls(reports, embed_texts(model, processor, reports.texts, batch_size=batch_size, progress=False))

    def closest(self, image_embed: np.ndarray, k: int = NUM_MATCHES) -> list[Match]:
        """The k reports most similar to one (d,) normalised image embedding, best first (ties: gallery order)."""
        similarity = self.text_embeds @ image_embed  # (N,)
        order = np.argsort(-similarity, kind="stable")[:k]
        return [Match(rank, float(similarity[i]), self.reports.ids[i], self.reports.texts[i], self.reports.images[i])
                for rank, i in enumerate(order.tolist(), start=1)]


def load_gallery(model, processor, data_dir: str | os.PathLike, split: str = "test",
                 max_reports: int | None = 500) -> ReportGallery:
    """A MIMIC-CXR-style split (the synthetic set is one) read with `mimic_image_set`, its reports embedded."""
    return ReportGallery.embed(model, processor, mimic_image_set(data_dir, split, max_samples=max_reports))


def synthetic_gallery_dir(cache_dir: str | os.PathLike, num_images: int = 200, seed: int = 0) -> Path:
    """A small synthetic set (generated once into `cache_dir`) for when no gallery is at hand, e.g. on a Space."""
    from .data.synthetic import generate_synthetic

    root = Path(cache_dir) / f"synthetic_{num_images}_{seed}"
    if not (root / "findings.jsonl").exists():
        generate_synthetic(root, num_images, seed=seed, workers=1, contact_sheet=False)
    return root


def demo_data_dir(model: str | os.PathLike) -> Path | None:
    """The demo's synthetic set next to a model exported by `training.demo`, if `model` is one."""
    if not Path(model).is_dir():  # a Hub id
        return None
    candidate = (Path(model) / DEMO_DATA_FROM_MODEL).resolve()
    return candidate if (candidate / "findings.jsonl").exists() else None


# --------------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """What the page shows for one upload."""

    grey: np.ndarray  # float32 (H, W) in [0, 1], the original image
    groundings: list[Grounding]
    scores: dict[str, float]  # finding -> P(present)
    matches: list[Match]


class GroundingApp:
    """A loaded model and its processor, with the report gallery embedded once at start-up."""

    def __init__(self, model, processor, gallery: ReportGallery | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS):
        self.model, self.processor, self.gallery = model.eval(), processor, gallery
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels

    def read(self, path: str | os.PathLike | None) -> np.ndarray:
        return read_upload(path, self.max_upload_bytes, self.max_pixels)

    def ground(self, grey: np.ndarray, phrases: Sequence[str]) -> list[Grounding]:
        maps = ground_phrases(self.model, self.processor, [grey] * len(phrases), list(phrases))
        return [Grounding(phrase, heatmap, peak_position(heatmap)) for phrase, heatmap in zip(phrases, maps)]

    def zero_shot(self, image_embed: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
        """P(finding present) of each finding: softmax over its positive and negative prompt sets (plan_hf.prompts)."""
        if not findings:
            return {}
        prompts = [finding_prompts(name) for name in findings]
        positive = class_embeddings(self.model, self.processor, {p.name: p.positive for p in prompts})
        negative = class_embeddings(self.model, self.processor, {p.name: p.negative for p in prompts})
        scores = binary_probabilities(image_embed[None], positive, negative, logit_scale(self.model))[0]  # (C,)
        return {name: float(score) for name, score in zip(findings, scores)}

    def analyse(self, path: str | os.PathLike | None, phrases_text: str | None,
                findings_text: str | None) -> Analysis:
        phrases = parse_phrases(phrases_text)
        grey = self.read(path)
        image_embed = embed_images(self.model, self.processor, [grey], progress=False)[0]  # (d,)
        matches = self.gallery.closest(image_embed) if self.gallery is not None else []
        return Analysis(grey, self.ground(grey, phrases), self.zero_shot(image_embed, split_entries(findings_text)),
                        matches)


# --------------------------------------------------------------------------------------------------------------------
# The page (Gradio)
# --------------------------------------------------------------------------------------------------------------------
def _message(err: Exception) -> str:
    """The page's text for a failure: an InputError as it is, anything else by type, the traceback to the log."""
    if isinstance(err, InputError):
        return str(err)
    logger.exception("the app failed on an input")
    return f"Something went wrong ({type(err).__name__}: {err}). The server log has the details."


def build_demo(app: GroundingApp, title: str = "PLAN phrase grounding"):
    """The Gradio page. Failures show in the page's message box (and as a warning), never as a traceback."""
    import gradio as gr

    def on_upload(path):
        if path is None:
            return None, ""
        try:
            grey = app.read(path)
        except Exception as err:  # noqa: BLE001  (every failure becomes a message)
            gr.Warning(_message(err))
            return None, _message(err)
        return grey_picture(grey), f"{Path(path).name}: {grey.shape[1]} x {grey.shape[0]} pixels."

    def pictures(analysis: Analysis | None, alpha: float) -> list[tuple[Image.Image, str]]:
        if analysis is None:
            return []
        return [(overlay(analysis.grey, g, alpha), f"{g.phrase} (peak at x={g.peak[1]}, y={g.peak[0]})")
                for g in analysis.groundings]

    def on_run(path, phrases_text, findings_text, alpha):
        try:
            analysis = app.analyse(path, phrases_text, findings_text)
        except Exception as err:  # noqa: BLE001
            gr.Warning(_message(err))
            return None, [], {}, [], [], _message(err)
        matches = analysis.matches
        thumbnails = [(_thumbnail(m.image), f"{m.rank}. {m.similarity:.3f}") for m in matches]
        rows = [[m.rank, round(m.similarity, 4), m.report] for m in matches]
        note = f"Grounded {len(analysis.groundings)} phrase(s) on a {analysis.grey.shape[1]} x " \
               f"{analysis.grey.shape[0]} image."
        return analysis, pictures(analysis, alpha), analysis.scores, thumbnails, rows, note

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nUpload a chest X-ray (PNG, JPEG or DICOM), type one or more phrases (one per line "
                    "or separated by ';') and press **Ground**. Each heat map is drawn over the original image; the "
                    "ring marks its peak.")
        analysis_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", type="filepath", elem_id="upload")
                preview = gr.Image(label="Uploaded image", type="pil", interactive=False, elem_id="preview",
                                   height=260)
                phrases = gr.Textbox(label="Phrases", value=DEFAULT_PHRASES, lines=3, elem_id="phrases")
                findings = gr.Textbox(label="Findings to score (zero-shot)", value="\n".join(DEFAULT_FINDINGS),
                                      lines=4, elem_id="findings")
                alpha = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heat-map opacity", elem_id="opacity")
                run = gr.Button("Ground", variant="primary", elem_id="ground")
                message = gr.Textbox(label="Messages", interactive=False, elem_id="message")
            with gr.Column(scale=2):
                # fit_columns=False: a lone map keeps its half-width cell, where it fits whole ("contain")
                heatmaps = gr.Gallery(label="Heat maps", format="png", columns=2, fit_columns=False, height="auto",
                                      object_fit="contain", elem_id="heatmaps")
                scores = gr.Label(label="Zero-shot P(finding present)", show_heading=False, elem_id="scores")
        gr.Markdown("### Closest reports of the gallery")
        with gr.Row():
            thumbnails = gr.Gallery(label="Their images", columns=NUM_MATCHES, height=220, object_fit="contain",
                                    elem_id="matches")
        reports = gr.Dataframe(headers=["rank", "similarity", "report"], datatype=["number", "number", "str"],
                               column_widths=["7%", "11%", "82%"], wrap=True, elem_id="reports", interactive=False)

        upload.change(on_upload, inputs=upload, outputs=[preview, message])
        run.click(on_run, inputs=[upload, phrases, findings, alpha],
                  outputs=[analysis_state, heatmaps, scores, thumbnails, reports, message])
        # The slider re-blends the kept maps: no model call.
        alpha.change(pictures, inputs=[analysis_state, alpha], outputs=heatmaps, trigger_mode="always_last")
    return demo


def _thumbnail(image: Any, side: int = 256) -> Image.Image:
    picture = grey_picture(load_image(image))
    picture.thumbnail((side, side))
    return picture


def offline_theme():
    """Gradio's default look with the system's fonts: the default theme fetches its fonts from Google."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The PLAN phrase-grounding app (Gradio).")
    parser.add_argument("--model", default=os.environ.get("PLAN_APP_MODEL"),
                        help="a saved model folder or a Hub id (default: $PLAN_APP_MODEL)")
    parser.add_argument("--gallery", default=os.environ.get("PLAN_APP_GALLERY"),
                        help="a MIMIC-CXR-style folder whose split gives the report gallery (default: the demo's "
                             "data next to a demo model, else a small synthetic set generated once)")
    parser.add_argument("--gallery-split", default="test")
    parser.add_argument("--gallery-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "plan_hf", "app"),
                        help="where the synthetic gallery is generated when there is no other")
    parser.add_argument("--no-gallery", action="store_true", help="skip the report gallery")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or $PLAN_APP_MODEL) is required: a saved model folder or a Hub id")
    return args


def create_app(args: argparse.Namespace) -> GroundingApp:
    from .evaluation.runner import load_model

    model, processor = load_model(args.model, args.device)
    gallery = None
    if not args.no_gallery:
        data_dir = args.gallery or demo_data_dir(args.model) or synthetic_gallery_dir(args.gallery_cache)
        gallery = load_gallery(model, processor, data_dir, args.gallery_split)
        logger.info("gallery: %d reports of %s (%s split)", len(gallery.reports), data_dir, args.gallery_split)
    return GroundingApp(model, processor, gallery, max_upload_bytes=int(args.max_upload_mb * 2**20))


def main(argv: Sequence[str] | None = None) -> None:
    # Before gradio is imported: no usage statistics, no version check; the page loads nothing remote.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the app needs Gradio, in the package's app extra: pip install -e '.[app]'") from None
    app = create_app(args)
    demo = build_demo(app)
    demo.queue().launch(server_name=args.host, server_port=args.port, max_file_size=app.max_upload_bytes,
                        theme=offline_theme(), footer_links=[], show_error=False)


__all__ = [
    "Analysis",
    "GroundingApp",
    "Grounding",
    "InputError",
    "Match",
    "ReportGallery",
    "build_demo",
    "create_app",
    "demo_data_dir",
    "finding_prompts",
    "load_gallery",
    "main",
    "mark_peak",
    "overlay",
    "parse_phrases",
    "peak_position",
    "read_upload",
    "split_entries",
    "synthetic_gallery_dir",
]
