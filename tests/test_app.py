"""The grounding app's logic without a browser: heat maps over the original image, the peak, bad uploads, zero-shot
scores, the report gallery, the command line and the Space files."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from plan_hf import PlanModel
from plan_hf.app import (
    GroundingApp,
    InputError,
    create_app,
    demo_data_dir,
    finding_prompts,
    load_gallery,
    mark_peak,
    overlay,
    parse_args,
    parse_phrases,
    peak_position,
    read_upload,
    split_entries,
    synthetic_gallery_dir,
)
from plan_hf.evaluation.data import mimic_image_set
from plan_hf.grounding import ground_phrase
from plan_hf.image_processing_plan import load_image
from plan_hf.tiny import tiny_plan_config

from .layouts import write_corrupt_image, write_dicom

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, processor, tokenizer):
    """A tiny PlanModel saved with its processor, as `python -m app --model DIR` loads it."""
    path = tmp_path_factory.mktemp("app_model")
    torch.manual_seed(0)
    PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("gallery")
    generate_synthetic(root, 100, seed=0, image_size=64, workers=1, contact_sheet=False)
    return root


@pytest.fixture(scope="module")
def app(saved_model, gallery_dir):
    return create_app(parse_args(["--model", str(saved_model), "--gallery", str(gallery_dir)]))


def xray_png(path: Path, height: int = 90, width: int = 70) -> Path:
    """A 16-bit PNG with a bright blob: non-square, so a map left in the model's square would not fit it."""
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-((yy - 0.3 * height) ** 2 + (xx - 0.6 * width) ** 2) / (2 * 8.0**2))
    Image.fromarray((1000 + 40000 * blob).astype(np.uint16)).save(path)
    return path


def test_phrases_split_on_lines_and_semicolons():
    assert split_entries(" right effusion\n\n;left apex ; right effusion;") == ["right effusion", "left apex"]
    assert parse_phrases("a; b\nc") == ["a", "b", "c"]
    for empty in ("", "  \n ; ", None):
        with pytest.raises(InputError, match="Type at least one phrase"):
            parse_phrases(empty)
    with pytest.raises(InputError, match="at most 2"):
        parse_phrases("a;b;c", max_phrases=2)


def test_heat_maps_cover_the_original_image_and_mark_their_peak(app, tmp_path):
    path = xray_png(tmp_path / "film.png")
    analysis = app.analyse(path, "right upper lobe opacity\nleft pleural effusion", "")
    assert analysis.grey.shape == (90, 70)
    assert [g.phrase for g in analysis.groundings] == ["right upper lobe opacity", "left pleural effusion"]
    for grounding in analysis.groundings:
        assert grounding.heatmap.shape == (90, 70)
        np.testing.assert_allclose(grounding.heatmap, ground_phrase(app.model, app.processor, path, grounding.phrase),
                                   rtol=1e-5, atol=1e-8)
        assert grounding.heatmap[grounding.peak] == np.nanmax(grounding.heatmap)
        picture = overlay(analysis.grey, grounding, alpha=0.5)
        assert picture.size == (70, 90)  # PIL: (width, height)
        assert picture.getpixel((grounding.peak[1], grounding.peak[0])) == (255, 255, 255)  # the cross-hair
    assert analysis.scores == {}  # no findings typed, none scored


def test_opacity_blends_only_the_heat_map():
    grey = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    heatmap = np.zeros((40, 30), np.float32)
    heatmap[25, 5] = 1.0
    from plan_hf.app import Grounding

    grounding = Grounding("x", heatmap, peak_position(heatmap))
    assert grounding.peak == (25, 5)
    clear, opaque = (np.asarray(overlay(grey, grounding, a)).astype(int) for a in (0.0, 1.0))
    far = (slice(0, 10), slice(20, 30))  # away from the ring
    expected = np.round(grey[far] * 255)
    assert np.abs(clear[far][..., 0] - expected).max() <= 1  # opacity 0: the X-ray itself
    assert np.abs(opaque[far] - expected[..., None]).max() > 20  # opacity 1: the colour map
    ring = mark_peak(Image.new("RGB", (30, 40)), (25, 5))
    assert ring.getpixel((5, 25)) == (255, 255, 255) and ring.getpixel((29, 0)) == (0, 0, 0)


def test_dicom_uploads_monochrome1_the_right_way_round(app, tmp_path):
    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (24, 1))  # (24, 40), brighter to the right
    mono2 = read_upload(write_dicom(tmp_path / "m2.dcm", ramp, photometric="MONOCHROME2"))
    mono1 = read_upload(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    assert mono2.shape == (24, 40) and mono2[0, -1] == 1.0 and mono2[0, 0] == 0.0
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    analysis = app.analyse(tmp_path / "m1.dcm", "cardiomegaly", "Cardiomegaly")
    assert analysis.groundings[0].heatmap.shape == (24, 40)


def test_the_real_cr_dicom_is_grounded_at_its_own_size(app):
    data_store = pytest.importorskip("data_store", reason="pydicom-data (RG1_UNCR.dcm) is not installed")
    import pydicom

    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    header = pydicom.dcmread(path, stop_before_pixels=True)
    grounding = app.analyse(path, "left pleural effusion", "").groundings[0]
    assert grounding.heatmap.shape == (header.Rows, header.Columns)
    assert abs(np.nansum(grounding.heatmap) - 1) < 1e-3


@pytest.mark.parametrize("make_upload, message", [
    (lambda d: d / "notes.txt", "notes.txt is not a readable PNG, JPEG or DICOM image"),
    (lambda d: write_corrupt_image(d / "cut.jpg"), "cut.jpg is not a readable PNG, JPEG or DICOM image"),
    (lambda d: d / "cut.dcm", "cut.dcm is not a readable PNG, JPEG or DICOM image: cannot decode DICOM pixel data"),
    (lambda d: d / "empty.png", "empty.png is empty"),
    (lambda d: d / "missing.png", "missing.png: the upload did not arrive"),
    (lambda d: None, "Upload a chest X-ray first"),
])
def test_bad_uploads_get_a_message_for_the_page(app, tmp_path, make_upload, message):
    (tmp_path / "notes.txt").write_text("Findings: none. This is a report, not a picture.\n" * 20)
    whole = write_dicom(tmp_path / "whole.dcm", shape=(64, 64)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:len(whole) // 2])  # a DICOM whose pixel data stops half-way
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError) as caught:
        app.analyse(make_upload(tmp_path), "effusion", "")
    assert message in str(caught.value)
    assert str(tmp_path) not in str(caught.value)  # the server's temporary path is not shown


def test_huge_uploads_and_empty_phrases_are_refused(saved_model, tmp_path):
    small = GroundingApp(*_load(saved_model), max_upload_bytes=1000, max_pixels=50 * 50)
    big = xray_png(tmp_path / "big.png", 400, 400)
    with pytest.raises(InputError, match=r"big.png is .* MB; the limit is 0 MB"):
        small.read(big)
    many = xray_png(tmp_path / "many.png", 60, 60)
    with pytest.raises(InputError, match="many.png has 60 x 60 pixels; the limit is 2,500"):
        GroundingApp(*_load(saved_model), max_pixels=50 * 50).read(many)
    with pytest.raises(InputError, match="Type at least one phrase"):
        small.analyse(many, " ; \n", "")


def _load(path):
    from plan_hf.evaluation.runner import load_model

    return load_model(str(path))


def test_zero_shot_scores_match_the_prompt_ensemble(app, tmp_path):
    path = xray_png(tmp_path / "film.png")
    findings = ["Pleural Effusion", "rib fracture"]
    scores = app.analyse(path, "effusion", "Pleural Effusion; rib fracture").scores
    assert list(scores) == findings

    custom = finding_prompts("rib fracture")
    assert custom.positive[:2] == ("Rib fracture.", "There is rib fracture.")
    assert "No rib fracture." in custom.negative and "The lungs are clear." in custom.negative

    # Reference: the model's own forward (1 image, all prompts), then the CLIP ensemble and a 2-way softmax by hand.
    model, processor = app.model, app.processor
    pixels = processor.image_processor([load_image(path)], return_tensors="pt")["pixel_values"]
    for name in findings:
        prompts = finding_prompts(name)
        sentences = list(prompts.positive + prompts.negative)
        text = processor.tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        texts, image = out.text_embeds.double(), out.image_embeds[0].double()
        pos = torch.nn.functional.normalize(texts[:len(prompts.positive)].mean(0), dim=0)
        neg = torch.nn.functional.normalize(texts[len(prompts.positive):].mean(0), dim=0)
        scale = model.logit_scale.detach().clamp(max=model.config.logit_scale_max).exp().double()
        expected = torch.softmax(scale * torch.stack([image @ pos, image @ neg]), dim=0)[0]
        assert scores[name] == pytest.approx(float(expected), abs=1e-5)


def test_gallery_ranks_the_test_reports_by_similarity(app, gallery_dir, tmp_path):
    test_split = mimic_image_set(gallery_dir, "test")
    assert len(app.gallery.reports) == len(test_split) > 5
    assert app.gallery.reports.ids == test_split.ids  # the test split, nothing else

    path = xray_png(tmp_path / "film.png")
    matches = app.analyse(path, "effusion", "").matches
    assert [m.rank for m in matches] == [1, 2, 3, 4, 5]

    # Reference: the model's forward scores the upload against every report at once.
    model, processor = app.model, app.processor
    text = processor.tokenizer(test_split.texts, padding=True, truncation=True, max_length=processor.max_length,
                               return_tensors="pt")
    pixels = processor.image_processor([load_image(path)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    cosine = (out.image_embeds @ out.text_embeds.T)[0].numpy()  # (N,)
    best = np.argsort(-cosine, kind="stable")[:5]
    np.testing.assert_allclose([m.similarity for m in matches], cosine[best], atol=1e-5)
    assert [m.report_id for m in matches] == [test_split.ids[i] for i in best]
    assert [m.report for m in matches] == [test_split.texts[i] for i in best]
    assert all(Path(m.image).is_file() for m in matches)


def test_demo_layout_and_command_line(saved_model, tmp_path):
    demo = tmp_path / "demo_out"
    (demo / "run" / "model").mkdir(parents=True)
    (demo / "data").mkdir()
    assert demo_data_dir(demo / "run" / "model") is None  # no synthetic set there yet
    (demo / "data" / "findings.jsonl").write_text("{}\n")
    assert demo_data_dir(demo / "run" / "model") == (demo / "data").resolve()
    assert demo_data_dir("org/plan-cxr") is None  # a Hub id is not a folder

    first = synthetic_gallery_dir(tmp_path / "cache", num_images=12)
    stamp = (first / "findings.jsonl").stat().st_mtime_ns
    assert synthetic_gallery_dir(tmp_path / "cache", num_images=12) == first  # generated once, then reused
    assert (first / "findings.jsonl").stat().st_mtime_ns == stamp
    assert len(mimic_image_set(first, "test")) >= 1

    args = parse_args(["--model", str(saved_model), "--no-gallery", "--port", "7999"])
    assert (args.port, args.host, args.no_gallery) == (7999, "127.0.0.1", True)
    assert create_app(args).gallery is None
    with pytest.raises(SystemExit):
        parse_args([])  # no model and no PLAN_APP_MODEL


def test_gallery_of_the_validation_split_and_an_empty_one(app, gallery_dir):
    from plan_hf.app import ReportGallery
    from plan_hf.evaluation.data import ImageSet

    validation = load_gallery(app.model, app.processor, gallery_dir, split="validate", max_reports=3)
    assert len(validation.reports) == 3 and validation.text_embeds.shape == (3, app.gallery.text_embeds.shape[1])
    assert np.allclose(np.linalg.norm(validation.text_embeds, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="the gallery has no reports"):
        ReportGallery.embed(app.model, app.processor, ImageSet(images=[], ids=[], texts=[]))


def test_space_files_run_app_py_with_the_app_extra():
    meta = yaml.safe_load((ROOT / "space" / "README.md").read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and (ROOT / meta["app_file"]).is_file()
    requirements = (ROOT / "space" / "requirements.txt").read_text().split()
    assert ".[app]" in requirements
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = pyproject.split("[project.optional-dependencies]")[1]
    assert "gradio" in extra.split("app =")[1].splitlines()[0]
    core = pyproject.split("dependencies = [")[1].split("]")[0]
    assert "gradio" not in core and "playwright" not in core  # the core package does not grow
