"""transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin`,
`ProcessorTesterMixin`), taken from the source distribution of the installed transformers version on PyPI.

The mixins live in the sdist's `tests/` (the wheel has no tests), so `load_common_tests()` downloads the sdist once with
pip into a cache directory (a file lock keeps parallel test processes from racing), extracts only the four common-test
files into a package of their own, and imports them from there. Nothing of transformers' test code is kept in this
repository.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from filelock import FileLock

COMMON_TEST_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_image_processing_common.py",
    "test_processing_common.py",
)
# A package name of its own: the files import their neighbours relatively, and "tests" is this repository's package.
PACKAGE = "transformers_common_tests"

# Modules the four files import that live in parts of transformers' repository the sdist does not ship. What is written
# in their place, and why it is enough for these models:
ABSENT_MODULES = {
    # The exporter tests (ONNX, ExecuTorch, AOTI, ...) are in tests/exporters/, not in the sdist: they are not run.
    f"{PACKAGE}/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # Only generative models' testers inherit from it; PlanModel does not generate text.
    f"{PACKAGE}/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # ConfigTester reads it only for configs without sub-configs; PlanConfig has a text and a vision sub-config.
    f"{PACKAGE}/utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
    # transformers' CI pre-downloads a few Hub files; without them the helper returns the URL unchanged, as upstream's
    # does when no local copy exists. The tests that would fetch those URLs are skipped (they need the Hub).
    "utils/fetch_hub_objects_for_ci.py": (
        "def url_to_local_path(url, return_url_if_not_found=True):\n    return url\n"
    ),
}


class CommonTestsUnavailable(RuntimeError):
    """The sdist could not be downloaded (no network, or no sdist for this version on the package index)."""


def cache_dir(version: str = transformers.__version__) -> Path:
    base = os.environ.get("PLAN_HF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "plan_hf"
    return Path(base) / f"transformers-tests-{version}"


def _download_sdist(version: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "--dest", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CommonTestsUnavailable(f"`pip download` of the transformers {version} sdist failed: {err}") from err
    archives = sorted(dest.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise CommonTestsUnavailable(
            f"cannot download the transformers {version} source distribution from the package index "
            f"({lines[-1] if lines else f'pip exited with {result.returncode}'})"
        )
    return archives[0]


def _extract(archive: Path, version: str, target: Path) -> None:
    wanted = {f"transformers-{version}/tests/{name}": name for name in COMMON_TEST_FILES}
    package = target / PACKAGE
    package.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                (package / wanted.pop(member.name)).write_bytes(tar.extractfile(member).read())
    if wanted:
        raise CommonTestsUnavailable(f"the transformers {version} sdist lacks {sorted(wanted.values())}")
    # test_configuration_common.py runs this package's __init__.py as a module: it must stay empty.
    for init in (package, package / "exporters", package / "generation", package / "utils"):
        init.mkdir(exist_ok=True)
        (init / "__init__.py").write_text("")
    for relative, text in ABSENT_MODULES.items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_text(text)


def prepare(version: str = transformers.__version__) -> Path:
    """The directory holding the extracted common tests; downloads and extracts them on first use."""
    root = cache_dir(version)
    complete = root / "tests-ready"
    if complete.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock", timeout=900):
        if complete.exists():  # another process finished while this one waited
            return root
        with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
            scratch = Path(scratch)
            archive = _download_sdist(version, scratch / "download")
            staged = scratch / "staged"
            _extract(archive, version, staged)
            shutil.rmtree(root, ignore_errors=True)
            staged.rename(root)
        complete.write_text(version)
    return root


def load_common_tests() -> SimpleNamespace:
    """Import the four common-test modules; `modeling`, `configuration`, `image_processing` and `processing`."""
    try:
        import parameterized  # noqa: F401 - the mixins' own test dependency
    except ImportError as err:
        raise ImportError("transformers' common test mixins need the `parameterized` package: "
                          "pip install parameterized") from err
    root = str(prepare())
    if root not in sys.path:
        sys.path.insert(0, root)
    with warnings.catch_warnings():
        # The files mark tests with transformers' own pytest marks (flash_attn_test, ...), registered only in its
        # repository's configuration.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modules = {name[len("test_"):-len("_common.py")]: importlib.import_module(f"{PACKAGE}.{name[:-3]}")
                   for name in COMMON_TEST_FILES}
    return SimpleNamespace(**modules)


__all__ = ["CommonTestsUnavailable", "cache_dir", "load_common_tests", "prepare"]
