"""Screenshots of what a user sees in TensorBoard after an example, taken in a real browser.

Starts ``tensorboard --logdir LOGDIR`` on the loopback address, opens its tabs in headless Chromium and
saves one PNG per view to ``--out`` (the pictures in docs/tensorboard.md come from here). Needs the
``chromium`` program (Debian: ``apt-get install chromium``) and the TensorBoard logs of a run, e.g.:

    python examples/quickstart.py                         # writes influence_logs/
    python docs/screenshots.py influence_logs --out docs/images

Nothing leaves the machine: TensorBoard listens on 127.0.0.1 only and is stopped at the end.

Without a browser, ``--extract TAG_PART`` saves the last image of every logged image tag that contains ``TAG_PART``
exactly as TensorBoard's images tab shows it (read from the event files), e.g.:

    python docs/screenshots.py influence_logs --extract all_samples --out docs/images/quickstart_default
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

VIEWS = {  # file name: the TensorBoard page (tab and filter) it shows
    "tensorboard_custom_scalars.png": "#custom_scalars",
    "tensorboard_scalars.png": "#timeseries&tagFilter=influence",
    "tensorboard_text.png": "#text",
    "tensorboard_images.png": "#images",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {seconds:.0f} s.")


def screenshot(browser: str, url: str, path: str, size: str) -> None:
    subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={path}", url,
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def extract_images(logdir: str, out: str, part: str) -> None:
    """Save the last image of each image tag holding ``part`` in ``logdir``'s event files, as ``<tag>.png``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.makedirs(out, exist_ok=True)
    for root, _, files in os.walk(logdir):
        for name in (f for f in files if f.startswith("events.out.tfevents")):
            events = EventAccumulator(os.path.join(root, name), size_guidance={"images": 0}).Reload()
            for tag in (t for t in events.Tags()["images"] if part in t):
                image = events.Images(tag)[-1]
                path = os.path.join(out, tag.rsplit("/", 1)[-1] + ".png")
                with open(path, "wb") as file:
                    file.write(image.encoded_image_string)
                print(f"{path}: {tag} at step {image.step}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir", help="the TensorBoard log folder of a run (e.g. influence_logs)")
    ap.add_argument("--out", default="screenshots", help="where the PNG files go")
    ap.add_argument("--size", default="1400,1000", help="browser window size, width,height")
    ap.add_argument("--extract", default=None, help="no browser: save the logged images whose tag holds this")
    args = ap.parse_args()
    if args.extract is not None:
        extract_images(args.logdir, args.out, args.extract)
        return
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("No Chromium found: install it (Debian: apt-get install chromium).")
    tensorboard = shutil.which("tensorboard") or os.path.join(os.path.dirname(sys.executable), "tensorboard")
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [tensorboard, "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base, 60)
        time.sleep(3)  # TensorBoard reads the event files in the background
        for name, view in VIEWS.items():
            path = os.path.join(args.out, name)
            screenshot(browser, base + view, path, args.size)
            print(f"{path}: {base}{view}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
