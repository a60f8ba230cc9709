"""Screenshot the viewer page of a run directory in headless Chromium (for the README).

    circuitctl discover demo output.dir=/tmp/demo && circuitctl evaluate faithfulness /tmp/demo
    python scripts/viewer_screenshot.py /tmp/demo docs/toy-ioi-viewer.png --click a1.h1

Needs Selenium and the Debian packages chromium and chromium-driver; downloads nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from circuitctl.viewer import render_html, run_payload

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--click", help="a node to click (its details are shown)")
    parser.add_argument("--size", default="1500,820", help="window width,height")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="viewer-shot-"))
    try:
        page = work / "circuit.html"
        page.write_text(render_html(run_payload(args.run_dir)), encoding="utf-8")
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in FLAGS + [f"--window-size={args.size}", f"--user-data-dir={work / 'profile'}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            driver.get(page.as_uri())
            WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
            if args.click:
                driver.execute_script("document.querySelector('.node[data-id=\"' + CSS.escape(arguments[0]) + '\"]')"
                                      ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", args.click)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
