"""The grounding app end to end in a real browser: `python -m app` serves the page, headless Chromium (Debian's
`chromium`, driven by Playwright) uploads X-rays, types phrases and reads back what the page shows.

Every request the page makes to anything but the app itself is refused and recorded: the page must work offline.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[app]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from .test_app import gallery_dir, saved_model  # noqa: E402,F401  (the tiny saved model and synthetic gallery)

pytestmark = pytest.mark.slow  # a server, a browser, a 5-megapixel DICOM: about a minute on 2 cores
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000  # a loaded 2-core machine: the first model call, a 5-megapixel DICOM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved_model, gallery_dir, tmp_path_factory):  # noqa: F811
    port = free_port()
    log = tmp_path_factory.mktemp("app_server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "app", "--model", str(saved_model), "--gallery",
                                    str(gallery_dir), "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """A persistent context on a fresh profile; `browser.remote` collects every refused outside request."""
    with playwright.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1100})
        context.remote = []

        def only_the_app(route):
            if route.request.url.startswith(server):
                route.continue_()
            else:
                context.remote.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_app)
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


def open_page(browser, server):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#ground")
    return page


def message(page) -> str:
    return page.input_value("#message textarea")


def wait_for_message(page, start: str) -> str:
    page.wait_for_function("start => document.querySelector('#message textarea').value.startsWith(start)", arg=start)
    return message(page)


def heat_map_sizes(page) -> list[tuple[int, int]]:
    """(width, height) of each heat-map picture as the browser decoded it."""
    page.wait_for_function("() => [...document.querySelectorAll('#heatmaps img')].length > 0 && "
                           "[...document.querySelectorAll('#heatmaps img')].every(i => i.complete && i.naturalWidth)")
    return [tuple(size) for size in page.eval_on_selector_all(
        "#heatmaps img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])")]


def heat_map_sources(page) -> list[str]:
    return page.eval_on_selector_all("#heatmaps img", "images => images.map(i => i.src)")


def ground(page, upload: Path, phrases: str) -> str:
    page.set_input_files("#upload input[type=file]", str(upload))
    wait_for_message(page, upload.name)  # the upload is read and previewed before grounding
    page.fill("#phrases textarea", phrases)
    page.click("#ground")
    return wait_for_message(page, "Grounded")


@pytest.fixture(scope="module")
def synthetic_xray(tmp_path_factory) -> Path:
    """One frontal film of the synthetic benchmark, at 256 px (taller than wide, like the real ones)."""
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("one_film")
    generate_synthetic(root, 1, seed=3, image_size=256, workers=1, contact_sheet=False)
    return next((root / "files").rglob("*.jpg"))


def test_synthetic_xray_heat_maps_appear_at_the_image_size(browser, server, synthetic_xray, tmp_path):
    width, height = Image.open(synthetic_xray).size
    assert width != height
    page = open_page(browser, server)
    note = ground(page, synthetic_xray, "left pleural effusion\nright apical pneumothorax")
    assert note == f"Grounded 2 phrase(s) on a {width} x {height} image."
    assert heat_map_sizes(page) == [(width, height)] * 2
    captions = page.inner_text("#heatmaps")
    assert "left pleural effusion (peak at" in captions and "right apical pneumothorax (peak at" in captions
    assert "Pleural Effusion" in page.inner_text("#scores")  # the default findings are scored
    assert page.locator("#matches img").count() == 5  # the five closest reports' images
    assert page.get_attribute("#reports [role=grid]", "aria-rowcount") == "6"  # the header and five reports

    before = heat_map_sources(page)
    page.fill("#opacity input[type=number]", "0.9")
    page.press("#opacity input[type=number]", "Enter")
    page.wait_for_function("old => { const now = [...document.querySelectorAll('#heatmaps img')].map(i => i.src);"
                           " return now.length === old.length && now.every((s, k) => s !== old[k]); }", arg=before)
    assert heat_map_sizes(page) == [(width, height)] * 2  # re-blended, not resized

    page.screenshot(path=tmp_path / "app_synthetic.png", full_page=True)
    assert (tmp_path / "app_synthetic.png").stat().st_size > 10_000
    assert browser.remote == []
    page.close()


def test_real_monochrome1_dicom_is_grounded_at_its_size(browser, server, tmp_path):
    data_store = pytest.importorskip("data_store", reason="pydicom-data (RG1_UNCR.dcm) is not installed")
    import pydicom

    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    header = pydicom.dcmread(path, stop_before_pixels=True)
    page = open_page(browser, server)
    assert ground(page, path, "cardiomegaly") == f"Grounded 1 phrase(s) on a {header.Columns} x {header.Rows} image."
    assert heat_map_sizes(page) == [(header.Columns, header.Rows)]
    page.screenshot(path=tmp_path / "app_dicom.png", full_page=True)
    assert browser.remote == []
    page.close()


def test_bad_upload_and_empty_phrase_show_a_message_not_a_traceback(browser, server, synthetic_xray, tmp_path):
    page = open_page(browser, server)
    notes = tmp_path / "report.txt"
    notes.write_text("No acute cardiopulmonary process.\n" * 50)
    page.set_input_files("#upload input[type=file]", str(notes))
    assert "report.txt is not a readable PNG, JPEG or DICOM image" in wait_for_message(page, "report.txt")
    page.close()

    page = open_page(browser, server)
    page.set_input_files("#upload input[type=file]", str(synthetic_xray))
    wait_for_message(page, synthetic_xray.name)
    page.fill("#phrases textarea", " ; ")
    page.click("#ground")
    assert wait_for_message(page, "Type").startswith("Type at least one phrase")
    assert page.locator("#heatmaps img").count() == 0
    assert "Traceback" not in page.inner_text("body")
    assert browser.remote == []
    page.close()
