"""The playground page in a real headless Chromium against a real Serve deployment."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import requests


API_KEY = "playground-key-7e1"
PROMPT = "def parse(line):\n"
SUFFIX = "    return x\n"  # the text after the cursor: sent as `suffix` to a FIM model


# ---- the route, in-process --------------------------------------------------------------------


def chrome(tmp_path):
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are needed: run `bash scripts/setup.sh --dev` "
                    "(installs Debian's chromium + chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    # A fresh profile and no background services: otherwise Chromium reaches for the network.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log")),
                            options=opts)


@pytest.fixture(scope="module")
def service(tiny_fim_checkpoint):
    from tests.support.live_service import live_service

    with live_service(tiny_fim_checkpoint, api_key=API_KEY) as s:
        yield s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_playground_streams_the_apis_greedy_completion_in_a_real_browser(service, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    auth = {"Authorization": f"Bearer {API_KEY}"}
    ref = requests.post(service.url + "/complete", json={"prompt": PROMPT, "suffix": SUFFIX, "max_new_tokens": 24,
                                                         "temperature": 0}, headers=auth, timeout=60).json()
    assert ref["completion"], ref  # something to compare with

    driver = chrome(tmp_path)
    try:
        driver.set_page_load_timeout(60)
        driver.get(service.url + "/")
        wait = WebDriverWait(driver, 120)
        find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
        # Auth is on: the page says so until it has the key, then it shows the model.
        wait.until(lambda d: "API key" in find("status").text)
        find("api-key").send_keys(API_KEY, Keys.TAB)  # change event: the page reloads /v1/models
        wait.until(lambda d: find("model").text == ref["model"])
        assert find("context").text == "128"

        code = find("code")
        code.clear()
        code.send_keys(PROMPT + SUFFIX)
        # The cursor between the two: this model can infill, so the text after it is the suffix.
        driver.execute_script("arguments[0].setSelectionRange(arguments[1], arguments[1]);"
                              "arguments[0].dispatchEvent(new Event('select'));", code, len(PROMPT))
        assert find("split").text.endswith(f"prefix {len(PROMPT)} chars, suffix {len(SUFFIX)} chars")
        for id_, value in (("max-new-tokens", "24"), ("temperature", "0")):
            find(id_).clear()
            find(id_).send_keys(value)
        find("complete").click()
        wait.until(lambda d: find("completion").text)  # streamed text arrived
        wait.until(lambda d: find("status").text in ("done", "the stream ended early") or "failed" in find("status").text)
        assert find("status").text == "done"

        # textContent: exactly the streamed characters (Selenium's .text trims whitespace).
        shown = find("completion").get_attribute("textContent")
        assert shown == ref["completion"]
        assert int(find("completion").get_attribute("data-events")) > 1, "the text should arrive in pieces"
        assert find("completion-tokens").text == str(ref["usage"]["completion_tokens"])
        assert find("prompt-tokens").text == str(ref["usage"]["prompt_tokens"])
        assert re.fullmatch(r"\d+ ms", find("latency").text) and re.fullmatch(r"\d+ ms", find("ttft").text)
        assert find("finish").text == ref["finish_reason"]
        find("insert").click()  # the middle goes in at the cursor, between prefix and suffix
        assert code.get_attribute("value") == PROMPT + ref["completion"] + SUFFIX

        shot = tmp_path / "playground.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        # The one expected failure is the 401 before the key was given; nothing else broke.
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert all("/v1/models" in m and "401" in m for m in errors), errors
    finally:
        driver.quit()
