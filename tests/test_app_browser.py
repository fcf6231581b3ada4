"""The web app in a real headless browser: type a prompt, click Generate, get the Python API's image.

Needs gradio and selenium (dev extras) and Debian's ``chromium`` and ``chromium-driver`` (``make test``
installs them as root, the way it installs the emoji font); without them the test says which is missing
and skips. The screenshot is written to ``outputs/tests/test_app_browser/``.
"""
from __future__ import annotations

import importlib.util
import io
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny import build_pipelines

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "tests" / "test_app_browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: it is a dev extra (pip install -e '.[dev]', or make test)"
    if CHROMIUM is None or DRIVER is None:
        return ("no headless browser: the test drives Debian's chromium through chromium-driver; install them with "
                "apt-get install chromium chromium-driver (make test does, as root)")
    return None


pytestmark = [pytest.mark.skipif(missing() is not None, reason=missing() or ""),
              pytest.mark.usefixtures("one_thread")]
PROMPT, SEED = "a red circle", 7


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free local port over a tiny text-to-image pipeline: (url, the pipeline's directory)."""
    from pipelines.app import build_app
    from pipelines.app_calls import load_entry

    root = tmp_path_factory.mktemp("app")
    dirs = build_pipelines(root / "pipelines")
    app = build_app([load_entry(dirs["text"])], root / "outputs")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/", dirs["text"]
    app.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def type_into(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def test_a_prompt_typed_in_the_page_gives_the_python_apis_image(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines import TextToImage

    url, pipeline_dir = served
    browser.get(url)
    wait = WebDriverWait(browser, 40)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#p0-t0-prompt textarea"))
    type_into(prompt, PROMPT)
    type_into(browser.find_element(By.CSS_SELECTOR, "#p0-t0-seed input"), str(SEED))
    browser.find_element(By.ID, "p0-t0-generate").click()
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#p0-t0-gallery img"))
    OUT.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(OUT / "generated.png"))
    with urllib.request.urlopen(shown[0].get_attribute("src"), timeout=10) as response:
        served_png = Image.open(io.BytesIO(response.read()))
        served_png.load()
    assert served_png.format == "PNG" and '"seed": 7' in served_png.text["parameters"]
    expected = TextToImage.from_pretrained(pipeline_dir)(PROMPT, seed=SEED, progress=False).images[0]
    assert np.array_equal(np.asarray(served_png.convert("RGB")), np.asarray(expected))


def test_invalid_settings_show_the_pipelines_message_in_the_page(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    type_into(browser.find_element(By.CSS_SELECTOR, "#p0-t0-num_inference_steps input"), "0")
    browser.find_element(By.ID, "p0-t0-generate").click()
    message = "num_inference_steps must be >= 1, got 0"
    WebDriverWait(browser, 30).until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(OUT / "error.png"))
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
