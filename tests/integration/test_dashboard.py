"""The live dashboard in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) watches a broker with real workers while tasks run,
one of them slow (its chip shows busy with its kernel) and one failing (its reason shows)."""

from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest

import pto

from ._util import ExternalBroker

pytestmark = pytest.mark.timeout(180)

CHROME = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
              None)
DRIVER = shutil.which("chromedriver")
WAIT_S = 15


def add_one(x, y):
    y[:] = x + 1


def slow_kernel(x, y):
    import time

    time.sleep(3.0)  # long enough for the page to see chip 1 busy on a loaded machine
    y[:] = x


def bad_kernel(x, y):
    raise ValueError("boom: this kernel always fails")


def fan(ctx, args):
    x = ctx.tensor(args["x"])
    for i in range(args["n"]):
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(i % 2, "k", [pto.Arg.input(x), pto.Arg.output(y)])


def single(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(args["chip"], args["kernel"], [pto.Arg.input(x), pto.Arg.output(y)])


@pytest.fixture
def browser():
    if CHROME is None or DRIVER is None:
        pytest.skip("no headless Chromium with chromedriver here (.ci/run installs Debian's "
                    "chromium and chromium-driver when apt-get is available): the dashboard's "
                    "browser test cannot run")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_shows_live_work_busy_chips_and_failures(browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    # Read through the page's own DOM in one call: the page redraws a few times a second,
    # so an element found in one WebDriver call may be replaced before the next.
    def text(css: str) -> str:
        return browser.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e === null ? '' : e.innerText;", css)

    def classes(css: str) -> str:
        return browser.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e === null ? '' : e.className;", css)

    def count(css: str) -> int:
        return browser.execute_script("return document.querySelectorAll(arguments[0]).length;",
                                      css)

    def number(css: str) -> int:
        return int(text(css).replace(",", "") or 0)

    def until(pred, what: str) -> None:
        WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(
            lambda _: pred(), message=f"the dashboard never showed {what}")

    port = free_port()
    b = ExternalBroker(tmp_path, workers=2, args=("--metrics-port", str(port)))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        until(lambda: text("#conn") == "live" and text("#address") == b.address, "the broker")
        assert number("#total-done") == 0 and number("#total-failed") == 0
        until(lambda: count(".chip") == 3, "3 workers")
        assert "no clients connected" in text("#client-table tbody")

        with pto.Runtime(level="host", platform="sim", broker=b.address) as rt:
            rt.register("fan", orch=fan, kernels={"k": add_one})
            rt.register("one", orch=single, kernels={"slow_kernel": slow_kernel,
                                                     "bad_kernel": bad_kernel})
            until(lambda: "no clients" not in text("#client-table tbody"), "the client")

            # a slow kernel: its chip turns busy with the kernel's name, then idle again
            future = rt.submit("one", args={"x": np.ones(4), "chip": 1, "kernel": "slow_kernel"})
            chip1 = '.chip[data-chip="1"]'
            until(lambda: "busy" in classes(chip1) and text(chip1 + " .kernel") == "slow_kernel",
                  "chip 1 busy running slow_kernel")
            assert "IDLE" in text('.chip[data-chip="0"]')
            future.result(timeout=30)
            until(lambda: number("#total-done") == 1 and "IDLE" in text(chip1),
                  "the slow task done and chip 1 idle")

            # the numbers follow the work as it runs
            rt.run("fan", args={"x": np.ones(4), "n": 40})
            until(lambda: number("#total-done") == 41, "41 tasks done")
            until(lambda: number('.chip[data-chip="0"] .done') == 20, "chip 0's 20 tasks")
            assert number("#total-submitted") == 41

            # a failing kernel shows up with its reason
            with pytest.raises(pto.TaskError, match="boom"):
                rt.run("one", args={"x": np.ones(4), "chip": 0, "kernel": "bad_kernel"})
            until(lambda: number("#total-failed") == 1, "the failure counted")
            row = text("#failures tbody")
            assert "bad_kernel" in row and "boom: this kernel always fails" in row, row
        until(lambda: "no clients connected" in text("#client-table tbody"), "the client gone")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors  # the page's script ran without errors
    finally:
        b.stop()
