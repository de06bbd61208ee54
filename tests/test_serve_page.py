"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium through that
chromedriver, so nothing is downloaded): type a prime, generate, see the text stream in, switch the
sentiment unit to positive, see the heatmap. CHARRNN_UPDATE_SCREENSHOT=1 also writes docs/img/serve.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import charrnn

pytest.importorskip("fastapi", reason="charrnn serve's tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("selenium", reason="the page test needs selenium: pip install -e '.[test]'")

from tests.test_serve import Running, status, wait_for, with_unit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MID_GREY = "rgb(235, 235, 235)"  # charrnn.render.unit_colors' colour of a value halfway between the fix values

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)),
    reason="no chromium/chromedriver here: run scripts/browser-deps.sh (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_the_page_streams_text_and_colours_the_unit(browser, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from charrnn.serve.app import Limits, create_app
    from charrnn.serve.models import load_models

    steered = with_unit(tiny_run, tmp_path / "steered.safetensors")
    server = Running(create_app(load_models([tiny_run, steered]), Limits(max_length=100_000)))
    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        el = browser.find_element
        browser.get(server.url + "/")
        wait.until(lambda d: len(Select(el(By.ID, "model")).options) == 2)
        Select(el(By.ID, "model")).select_by_value("steered")
        assert el(By.ID, "sentiment").is_displayed()  # this model has a unit: the switch shows
        for field, value in (("prime", "The king"), ("length", "100000"), ("seed", "1")):
            el(By.ID, field).clear()
            el(By.ID, field).send_keys(value)

        # a long generation: text is on the page while it is still being generated, then Stop ends it
        el(By.ID, "generate").click()
        wait.until(lambda d: len(el(By.ID, "output").text) > 40 and el(By.ID, "stop").is_enabled())
        assert el(By.ID, "output").text.startswith("The king")
        assert el(By.ID, "status").text == "generating..."
        el(By.ID, "stop").click()
        wait.until(lambda d: el(By.ID, "status").text.startswith("stopped after"))
        wait_for(lambda: status(server)["samples"] == 0, "the stopped stream to leave")

        # positive: a whole sample, then the unit's value over it as the heatmap
        el(By.ID, "sent-positive").click()
        el(By.ID, "length").clear()
        el(By.ID, "length").send_keys("160")
        el(By.ID, "generate").click()
        wait.until(lambda d: el(By.ID, "status").text.startswith("done"))
        spans = browser.find_elements(By.CSS_SELECTOR, "#output span.ch")
        assert len(spans) == len("The king") + 160
        colours = {s.value_of_css_property("background-color") for s in spans}
        assert len(colours) > 3 and colours != {MID_GREY}
        assert all(abs(float(s.get_attribute("title"))) < 100 for s in spans[:20])
        assert el(By.ID, "legend").is_displayed()
        # the Words switch: "any" gives the text the API gives with words="any" for the same seed
        model = charrnn.load(steered)
        Select(el(By.ID, "words")).select_by_value("any")
        el(By.ID, "generate").click()
        wait.until(lambda d: el(By.ID, "status").text.startswith("done"))
        # in fp32, as the server samples (auto could pick bf16 on this machine, and bf16 draws other text)
        free = model.generate("The king", length=160, seed=1, sentiment="positive", words="any", precision="fp32")[0]
        known = model.generate("The king", length=160, seed=1, sentiment="positive", precision="fp32")[0]
        def squeeze(t: str) -> str:  # the heatmap's spans lay out whitespace their own way: compare the rest
            return "".join(t.split())

        shown = squeeze(el(By.ID, "output").text)
        assert shown == squeeze(free) and shown != squeeze(known)
        Select(el(By.ID, "words")).select_by_value("known")
        browser.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("CHARRNN_UPDATE_SCREENSHOT"):
            (REPO / "docs" / "img").mkdir(exist_ok=True)
            shutil.copy(tmp_path / "serve.png", REPO / "docs" / "img" / "serve.png")
    finally:
        server.stop()
