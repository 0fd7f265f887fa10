"""The HTML report in a real browser: headless Chromium loads the self-contained page (no network), and the
screenshot shows each plot where the page lays it out, pixel for pixel what the harness drew."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm_harness.html_report import render_html
from qvlm_harness.plots import png_bytes, report_figures
from qvlm_harness.report import paper_tables
from tests.report_rows import synthetic_rows

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install -y chromium")
WIDTH = 1360
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {id: i.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height, natural: i.naturalWidth};
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({imgs, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script></body>"""


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def render_and_check(tmp_path: Path, images: dict[str, bytes], drawn: dict[str, bytes]) -> list[str]:
    """Render the report with `images` in Chromium; the problems found checking each plot against `drawn`."""
    rows = synthetic_rows()
    page = tmp_path / "report.html"
    page.write_text(render_html(rows, paper_tables(rows), images), encoding="utf-8")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", PROBE), encoding="utf-8")

    dom = chromium(tmp_path, "--virtual-time-budget=3000", f"--window-size={WIDTH},1000", "--dump-dom",
                   probe_page.as_uri()).stdout
    probe = json.loads(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert [i["id"] for i in probe["imgs"]] == [f"fig-{k}" for k in images]
    assert all(i["natural"] > 0 for i in probe["imgs"])  # every data: URI decoded as an image

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--window-size={WIDTH},{probe['height']}", f"--screenshot={shot}", page.as_uri())
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert screen.shape[:2] == (probe["height"], WIDTH)
    problems = []
    for img in probe["imgs"]:
        x, y, w, h = (round(img[k]) for k in ("x", "y", "w", "h"))
        region = screen[y:y + h, x:x + w]
        name = img["id"].removeprefix("fig-")
        ink = (region.min(axis=2) < 200).mean()  # share of pixels that are not near-white
        colored = ((region.max(axis=2) - region.min(axis=2)) > 80).sum()  # saturated pixels: lines and markers
        if not (ink > 0.03 and colored > 200):
            problems.append(f"plot {name} looks blank in the screenshot (ink {ink:.3f}, {colored} coloured pixels)")
        ref = np.asarray(Image.open(io.BytesIO(drawn[name])).convert("RGB").resize((w, h))).astype(np.int16)
        if np.abs(region - ref).mean() >= 12:
            problems.append(f"plot {name} on screen is not what the harness drew")
    # outside the plots the page is white paper with black tables: no colour
    below = screen[round(max(i["y"] + i["h"] for i in probe["imgs"])) + 10:]
    if ((below.max(axis=2) - below.min(axis=2)) > 80).mean() >= 0.01:
        problems.append("colour outside the plot regions")
    return problems


def figures() -> dict[str, bytes]:
    return {k: png_bytes(f) for k, f in report_figures(synthetic_rows()).items()}


def test_report_renders_with_its_plots_in_chromium(tmp_path):
    images = figures()
    assert render_and_check(tmp_path, images, images) == []


def test_the_check_catches_blank_plots(tmp_path):
    """Negative control: the same page with white images in place of the plots must be flagged."""
    images = figures()
    blank = {}
    for k, v in images.items():
        buf = io.BytesIO()
        Image.new("RGB", Image.open(io.BytesIO(v)).size, "white").save(buf, format="PNG")
        blank[k] = buf.getvalue()
    problems = render_and_check(tmp_path, blank, images)
    assert sum("looks blank" in p for p in problems) == len(images)
