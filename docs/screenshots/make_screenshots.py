"""Make the README's screenshots: the endpoint's page with a mask on a demo image, and report.html.

Run after ``rayseg demo`` (it leaves a trained model, the sample images and an evaluation)::

    .venv/bin/python docs/screenshots/make_screenshots.py

Needs the browser of the browser tests (``apt-get install chromium chromium-driver``).  Starts a
local Ray and the endpoint on a free loopback port, segments one image through the page as a user
would, and renders ``report.html`` from the demo's ``report.json`` and overlays in a temporary copy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))   # tests.browser_util, run from anywhere

from tests.browser_util import start_chromium, wait_for  # noqa: E402

WORK = ROOT / "rayseg_work"


def page_screenshot(model: Path, image: Path, out: Path) -> None:
    """Segment ``image`` through the page served for ``model``; save the window as a PNG."""
    from pipelines.raycluster import ensure_ray
    from pipelines.serve.control import start_endpoint, stop_endpoint
    from tests.serve_util import endpoint_config

    ensure_ray()
    rows = tempfile.mkdtemp(prefix="rayseg-screenshot-rows-")   # the request's row goes here
    url = start_endpoint(str(model), rows, config=endpoint_config())
    driver = start_chromium(1200, 900)
    try:
        driver.get(f"{url}/")
        driver.find_element("id", "file").send_keys(str(image))
        wait_for(driver, "document.body.dataset.segmented")
        driver.execute_script("const s = document.getElementById('opacity'); s.value = 0.6;"
                              "s.dispatchEvent(new Event('input'));")
        _full_page(driver, 1200, out)
    finally:
        driver.quit()
        stop_endpoint()


def report_screenshot(report_dir: Path, out: Path) -> None:
    """Write report.html for the evaluation in ``report_dir`` (in a copy) and capture it."""
    from pipelines.evaluate.report_html import write_html

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "eval"
        shutil.copytree(report_dir, copy, ignore=shutil.ignore_patterns("predictions"))
        page = Path(write_html(json.loads((copy / "report.json").read_text()), str(copy)))
        driver = start_chromium(1200, 900)
        try:
            driver.get(page.as_uri())
            wait_for(driver, "[...document.images].every(i => i.complete)")
            _full_page(driver, 1200, out)
        finally:
            driver.quit()


def _full_page(driver, width: int, out: Path) -> None:
    # the window's height includes the browser's own bars: add them to the page's height
    height, bars = driver.execute_script("return [document.documentElement.scrollHeight, "
                                         "outerHeight - innerHeight]")
    driver.set_window_size(width, height + bars)
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORK / "demo/models/demo/v1")
    parser.add_argument("--image", type=Path, default=WORK / "sample/images/sample_0025.png")
    parser.add_argument("--report-dir", type=Path, default=WORK / "demo/eval")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/screenshots")
    args = parser.parse_args()
    page_screenshot(args.model, args.image, args.out / "endpoint-page.png")
    report_screenshot(args.report_dir, args.out / "report-html.png")


if __name__ == "__main__":
    main()
