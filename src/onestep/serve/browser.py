"""Drive the page of ``onestep serve`` in headless Chromium (Debian's ``chromium`` and ``chromium-driver``): pick a
class, press Generate, wait for every image, move a latent-walk slider, optionally run the throughput timing, and
save a screenshot. The browser test and the README's screenshot (``python -m onestep.serve.browser URL --out
docs/serve.png``) both use it.

Nothing here downloads a browser: the system's chromedriver is passed to selenium explicitly, so selenium-manager
is never run (with a driver path given, selenium skips it). selenium is optional (the browser test and the screenshot
need it): the functions that drive the browser import it, so the module loads without it and :func:`find_chromium`
says what is missing.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find_chromium() -> tuple[str, str] | str:
    """(browser, chromedriver) paths, or the reason why there are none (a line for ``pytest.skip``)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    browser = next((p for p in BROWSERS if Path(p).is_file()), None) or shutil.which("chromium")
    driver = next((p for p in DRIVERS if Path(p).is_file()), None) or shutil.which("chromedriver")
    if not browser or not driver:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromium-driver", driver)) if not p)
        return f"{missing} not installed (apt-get install -y chromium chromium-driver; `make test` does it where apt exists)"
    return browser, driver


def start_driver(browser: str, driver: str, width: int = 1360, height: int = 1280):
    """A headless Chromium WebDriver on the given binaries (no selenium-manager)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def _wait(drv, cond, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.05).until(cond)
    except Exception:
        state = drv.execute_script("return document.body.dataset.state + ' / ' + "
                                   "document.getElementById('status').textContent")
        raise TimeoutError(f"timed out after {timeout} s waiting for {what} (page: {state})") from None


def drive(url: str, screenshot: str | Path | None = None, label: int = 3, seed: int = 7, throughput: bool = False,
          timeout: float = 60.0, browser: str | None = None, driver: str | None = None) -> dict:
    """Run the page's main flow once and return what it showed: {"panels": {key: {"frames", "distinct", "latency_text",
    "latency", "speedup"}}, "walk": {key: {"before", "after", "t"}}, "throughput": [rows as text] | None,
    "screenshot": path | None}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if browser is None or driver is None:
        found = find_chromium()
        if isinstance(found, str):
            raise RuntimeError(found)
        browser, driver = found
    drv = start_driver(browser, driver)
    try:
        drv.get(url)
        _wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready", timeout,
              "the page to load")
        Select(drv.find_element(By.ID, "class")).select_by_value(str(label))
        seed_box = drv.find_element(By.ID, "seed")
        seed_box.clear()
        seed_box.send_keys(str(seed))
        drv.find_element(By.ID, "generate").click()
        _wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"),
              timeout, "Generate to finish")
        if drv.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error":
            raise RuntimeError(f"the page reports: {drv.find_element(By.ID, 'status').text}")
        panels = {}
        for p in drv.find_elements(By.CSS_SELECTOR, "#panels .panel"):
            key = p.get_attribute("data-key")
            img = drv.find_element(By.ID, f"img-{key}")
            lat = drv.find_element(By.ID, f"latency-{key}")
            panels[key] = {"done": img.get_attribute("data-done") == "1", "src": img.get_attribute("src"),
                           "frames": int(img.get_attribute("data-frames") or 0),
                           "distinct": int(img.get_attribute("data-distinct") or 0),
                           "latency_text": lat.text, "latency": float(lat.get_attribute("data-value") or "nan"),
                           "speedup_text": drv.find_element(By.ID, f"speedup-{key}").text}
        walk = {}
        keys = [w.get_attribute("id")[len("walk-"):] for w in drv.find_elements(By.CSS_SELECTOR, "#walks .walk")]
        for key in keys:
            img_id = f"walk-img-{key}"
            _wait(drv, lambda d: int(d.find_element(By.ID, img_id).get_attribute("data-draws") or 0) >= 1, timeout,
                  f"the {key} walk's first image")
            before = drv.find_element(By.ID, img_id).get_attribute("src")
            slider = drv.find_element(By.ID, f"slider-{key}")
            slider.click()  # a click at the slider's centre moves it to t = 0.5
            slider.send_keys(Keys.ARROW_RIGHT * 10)  # then ten steps to the right: t = 0.6
            def redrawn(d, img_id=img_id, slider=slider, before=before):
                img = d.find_element(By.ID, img_id)
                t = img.get_attribute("data-t")
                return (t is not None and abs(100 * float(t) - float(slider.get_attribute("value"))) < 1e-6
                        and img.get_attribute("src") != before)

            _wait(drv, redrawn, timeout, f"the {key} walk to redraw at the slider's position")
            walk[key] = {"before": before, "after": drv.find_element(By.ID, img_id).get_attribute("src"),
                         "t": float(drv.find_element(By.ID, img_id).get_attribute("data-t"))}
        rows = None
        if throughput:
            drv.find_element(By.ID, "throughput").click()
            _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#tp-table tbody tr"), max(timeout, 120),
                  "the throughput timing")
            rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                    for r in drv.find_elements(By.CSS_SELECTOR, "#tp-table tbody tr")]
        shot = None
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # the window's height includes its frame: grow it until the page fits the viewport
                page, inner = drv.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
                if inner >= page:
                    break
                drv.set_window_size(1360, drv.get_window_size()["height"] + page - inner + 8)
            drv.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.2)
            drv.save_screenshot(str(screenshot))
            shot = str(screenshot)
        return {"panels": panels, "walk": walk, "throughput": rows, "screenshot": shot}
    finally:
        drv.quit()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m onestep.serve.browser",
                                description="Drive a running `onestep serve` page in headless Chromium and save a "
                                            "screenshot.")
    p.add_argument("url", help="the URL `onestep serve` printed")
    p.add_argument("--out", default="docs/serve.png", help="screenshot path (default: docs/serve.png)")
    p.add_argument("--class", dest="label", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-throughput", action="store_true", help="do not run the throughput timing")
    args = p.parse_args(argv)
    res = drive(args.url, args.out, label=args.label, seed=args.seed, throughput=not args.no_throughput,
                timeout=120)
    for key, v in res["panels"].items():
        print(f"{key}: {v['latency_text']}, {v['speedup_text']}, {v['frames']} frames")
    print(f"screenshot: {res['screenshot']}")


if __name__ == "__main__":
    main()
