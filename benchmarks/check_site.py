"""Open a run's report site (``<run>/index.html``, written by ``pipelines/site/``) in headless Chromium: count the
images that did not load (on index.html and on each rendered stage report), measure the page, and save a screenshot
of the whole page. Needs a Chromium binary (Debian: ``apt-get install chromium``); CI has none, so this is a script
and not a test (tests/test_site.py checks the files and links without a browser).

    python benchmarks/check_site.py RUN_DIR [--screenshot out.png] [--write] [--docs-image docs/images/x.png]

``--write`` (re)writes the site first (``write_site(RUN_DIR)``, the inputs remembered in site/sources.json).
``--docs-image`` also saves a downscaled copy of the screenshot's top (under ~400 KB) for the docs. Exits 1 when an
image is broken or the page is missing.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py is named like the stdlib module `select` (which `subprocess` imports): this folder goes last on
# the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

PROBE_ID = "__site_check__"
# Added to a copy of the page (beside it, so that its relative links resolve): after the load event, what loaded.
PROBE = f"""<script>
window.addEventListener('load', function () {{
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }})
                     .map(function (i) {{ return i.getAttribute('src'); }});
  var out = document.createElement('pre');
  out.id = '{PROBE_ID}';
  out.textContent = JSON.stringify({{images: images.length, broken: broken,
    height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth,
    title: document.title}});
  document.body.appendChild(out);
}});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install -y chromium (or put google-chrome on PATH)")


def _flags(width: int, height: int) -> list[str]:
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             f"--window-size={width},{height}", "--virtual-time-budget=15000", "--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return flags


def probe(page: Path, width: int = 1280) -> dict:
    """Load a copy of ``page`` with the probe script and read back what it found (--dump-dom)."""
    text = page.read_text(encoding="utf-8")
    copy = page.with_name(f".check-{page.name}")
    copy.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    try:
        done = subprocess.run([chromium(), *_flags(width, 1000), "--dump-dom", copy.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    finally:
        copy.unlink(missing_ok=True)
    start = done.stdout.find(f'<pre id="{PROBE_ID}">')
    if start < 0:
        return {"error": f"the page did not finish loading (chromium exit {done.returncode}): "
                         f"{done.stderr.strip()[-500:]}"}
    body = done.stdout[start:].split(">", 1)[1].split("</pre>", 1)[0]
    import html

    return json.loads(html.unescape(body))


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *_flags(width, height), f"--user-data-dir={profile}",
                        f"--screenshot={out.resolve()}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=180, check=True)


def docs_image(shot: Path, out: Path, max_height: int, width: int, limit_bytes: int = 400_000) -> tuple[int, int]:
    """The screenshot's top ``max_height`` pixels, scaled to ``width`` and quantised until under ``limit_bytes``."""
    from PIL import Image

    with Image.open(shot) as image:
        top = image.crop((0, 0, image.width, min(image.height, max_height))).convert("RGB")
    scaled = top.resize((width, round(top.height * width / top.width)), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    for colours in (256, 128, 64, 32):
        scaled.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, optimize=True)
        if out.stat().st_size <= limit_bytes:
            break
    return scaled.size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--screenshot", default=None, help="where the full-page PNG goes (default: "
                        "RUN_DIR/site/screenshot.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--write", action="store_true", help="(re)write the site first")
    parser.add_argument("--docs-image", default=None, help="also save the page's top, downscaled, here")
    parser.add_argument("--docs-height", type=int, default=3200, help="pixels of the page's top in --docs-image")
    parser.add_argument("--docs-width", type=int, default=900)
    args = parser.parse_args()
    run = Path(args.run_dir)
    if args.write:
        from domainsynth.pipelines.site import write_site

        print(f"wrote {write_site(str(run))}")
    index = run / "index.html"
    if not index.is_file():
        print(f"no {index}: write it with domainsynth.pipelines.site.write_site", file=sys.stderr)
        return 1
    failures = 0
    pages = [index, *sorted((run / "site" / "reports").glob("*.html"))]
    found = {}
    for page in pages:
        result = found[page] = probe(page, args.width)
        name = page.relative_to(run)
        if "error" in result:
            print(f"{name}: {result['error']}")
            failures += 1
            continue
        print(f"{name}: {result['images']} images, {len(result['broken'])} broken, page "
              f"{result['width']}x{result['height']} px" + (f": {', '.join(result['broken'])}"
                                                            if result["broken"] else ""))
        failures += bool(result["broken"])
    height = min(max(found[index].get("height", 4000), 800), 16000)
    shot = Path(args.screenshot) if args.screenshot else run / "site" / "screenshot.png"
    screenshot(index, shot, args.width, height)
    print(f"screenshot: {shot} ({args.width}x{height}, {shot.stat().st_size:,} bytes)")
    if args.docs_image:
        size = docs_image(shot, Path(args.docs_image), args.docs_height, args.docs_width)
        print(f"docs image: {args.docs_image} ({size[0]}x{size[1]}, {Path(args.docs_image).stat().st_size:,} bytes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
