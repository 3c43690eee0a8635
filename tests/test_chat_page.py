"""The chat page at / in a real headless Chromium (Debian's chromium and chromedriver, through
Selenium), against a real daemon with the real model: an answer that grows as it streams, a
follow-up that needs the first answer, a stopped answer, Chinese, and model output with markup
shown as text."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.conftest import Daemon

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("the chat page is tested in chromium: `make system-deps` installs "
                    "chromium and chromium-driver")  # fmt: skip
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not look for a driver on the network
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--lang=en-US"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    b = webdriver.Chrome(service=Service(executable_path=driver, log_output=str(log)),
                         options=options)  # fmt: skip
    b.set_page_load_timeout(30)
    yield b
    b.quit()


@pytest.fixture
def page(daemon: Daemon, browser: webdriver.Chrome) -> webdriver.Chrome:
    browser.get(f"{daemon.http_url}/")
    until(lambda: browser.find_element(By.ID, "health").get_attribute("data-state") == "ready")
    return browser


def until(check: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def ask(page: webdriver.Chrome, question: str) -> WebElement:
    """Type and send a question; the answer element it gets."""
    before = len(page.find_elements(By.CSS_SELECTOR, "#log .answer"))
    box = page.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    page.find_element(By.ID, "send").click()
    return until(lambda: page.find_elements(By.CSS_SELECTOR, "#log .answer")[before:] or None)[0]


def watch(answer: WebElement) -> list[str]:
    """The answer's text each time it changed, until it is no longer streaming."""
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    while answer.get_attribute("data-state") == "streaming":
        text = answer.find_element(By.CLASS_NAME, "md").text
        if not seen or text != seen[-1]:
            seen.append(text)
        assert time.monotonic() < deadline, "the answer never finished"
        time.sleep(0.01)
    seen.append(answer.find_element(By.CLASS_NAME, "md").text)
    return seen


def no_page_errors(page: webdriver.Chrome) -> None:
    severe = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_an_answer_grows_as_it_streams_and_a_follow_up_remembers(
    page: webdriver.Chrome, tmp_path: Path
) -> None:
    answer = ask(page, "My machine is called Heron-7. Say hello to it in one short sentence.")
    texts = watch(answer)
    assert answer.get_attribute("data-state") == "done"
    grew = [t for t in texts if t]
    assert len(set(grew)) >= 3, f"the answer did not grow over several updates: {texts}"
    assert all(b.startswith(a) for a, b in zip(grew, grew[1:])), "it must only grow"
    assert answer.find_element(By.CLASS_NAME, "source").text.startswith("local model")
    follow = ask(page, "What is my machine called? Reply with its name only.")
    watch(follow)
    assert "Heron" in follow.find_element(By.CLASS_NAME, "md").text
    shots = Path(os.environ.get("EDGEAGENT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(shots / "chat-page.png"))
    no_page_errors(page)


def test_a_long_answer_can_be_stopped(page: webdriver.Chrome, daemon: Daemon) -> None:
    answer = ask(page, "List 80 maintenance checks for a hydraulic press, numbered.")
    until(lambda: len(answer.find_element(By.CLASS_NAME, "md").text) > 40)
    page.find_element(By.ID, "stop").click()
    until(lambda: answer.get_attribute("data-state") == "stopped")
    kept = answer.find_element(By.CLASS_NAME, "md").text
    assert kept and "(stopped)" in answer.text
    time.sleep(0.5)
    assert answer.find_element(By.CLASS_NAME, "md").text == kept, "it went on after Stop"
    assert not page.find_element(By.ID, "stop").is_displayed()
    # The daemon stopped generating too: its slots are free again.
    health = page.execute_script(
        "return fetch('/health').then(r => r.json()).then(h => h.slots_processing)"
    )
    assert health == 0


def test_a_question_in_chinese_gets_an_answer_in_chinese(page: webdriver.Chrome) -> None:
    page.find_element(By.ID, "new").click()
    answer = ask(page, "请用中文回答：PLC 是什么？一句话。")  # noqa: RUF001 (Chinese punctuation)
    watch(answer)
    assert re.search(r"[\u4e00-\u9fff]", answer.find_element(By.CLASS_NAME, "md").text)
    assert "请用中文回答" in page.find_element(By.CSS_SELECTOR, "#log .question").text


def test_markup_in_an_answer_is_shown_as_text_and_never_runs(page: webdriver.Chrome) -> None:
    page.find_element(By.ID, "new").click()
    answer = ask(page, "Write a minimal HTML page whose body is <script>alert(1)</script>. "
                       "Only the code, in a code block.")  # fmt: skip
    watch(answer)
    shown = answer.find_element(By.CLASS_NAME, "md").text
    assert "<script>" in shown, shown
    assert answer.find_elements(By.TAG_NAME, "pre"), "the code block is rendered as one"
    assert page.find_elements(By.CSS_SELECTOR, "#log script, #log iframe, #log img") == []
    with pytest.raises(NoAlertPresentException):
        _ = page.switch_to.alert.text
    no_page_errors(page)


def test_an_answer_from_the_manuals_shows_its_sources_first(
    manuals_daemon: Daemon, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get(f"{manuals_daemon.http_url}/")
    until(lambda: browser.find_element(By.ID, "health").get_attribute("data-state") == "ready")
    manuals = browser.find_element(By.ID, "manuals")
    assert manuals.is_selected(), "the switch starts as the box's default (kb_default)"
    answer = ask(browser, "How do I change the label roll on the labeller?")
    sources = until(lambda: answer.find_elements(By.CLASS_NAME, "sources"))[0]
    first = sources.find_element(By.TAG_NAME, "details")
    assert first.get_attribute("open") is not None
    summary = first.find_element(By.TAG_NAME, "summary").text
    assert summary == "[1] Labeller L2 manual · Label roll change", summary
    passage = first.find_element(By.CLASS_NAME, "passage").text
    assert '<img src=x onerror="window.pwned=1">' in passage and "press RESET twice" in passage
    watch(answer)
    assert answer.get_attribute("data-state") == "done"
    assert answer.find_element(By.CLASS_NAME, "source").text.startswith("local model")
    # Above the answer, and markup in a manual never runs.
    children = browser.execute_script(
        "return Array.from(arguments[0].children).map(e => e.className)", answer
    )
    assert children.index("sources") < children.index("md"), children
    assert answer.find_elements(By.TAG_NAME, "img") == []
    shots = Path(os.environ.get("EDGEAGENT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / "chat-page-manuals.png"))
    # Switched off, the same question is answered without them.
    manuals.click()
    plain = ask(browser, "How do I change the label roll on the labeller?")
    until(lambda: plain.find_element(By.CLASS_NAME, "md").text)  # its words have begun...
    assert plain.find_elements(By.CLASS_NAME, "sources") == []  # ...with no sources first
    browser.find_element(By.ID, "stop").click()
    until(lambda: plain.get_attribute("data-state") == "stopped")
    no_page_errors(browser)
