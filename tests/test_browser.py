"""The chat page in a real browser (Debian's chromium and chromium-driver, headless), on the
universal_prompted_assistant run by `parley up` on the embedded SmolLM2.

The distribution runs with API keys (PARLEY_API_KEYS), as a deployment should: the page asks for
the key once, keeps it in the tab across reloads, and a new tab asks again. A person types a
question and sees the answer with the skill's name; after a reload the turn is still there (from
the agent's state); a second tab is a separate dialog. The screenshot goes to tests/output/chat.png
(docs/chat.png is a copy of one).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from parley.repo import Repo
from parley.up import run_distribution
from support.servers import REPO_ROOT

pytestmark = pytest.mark.model

DIST = "universal_prompted_assistant"
LINKED = ["services", "skills", "common", "components", "docker-compose.yml", ".env", "components.tsv"]
PROMPT = "You are a cheerful assistant. Answer in one short sentence."
ANSWER_TIMEOUT = 300  # the real model on a shared 2-core CPU
API_KEY = "browser-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OUTPUT = REPO_ROOT / "tests" / "output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def write_checkout(root: Path) -> Path:
    """A checkout whose code is this one's (links), with a greedy, short config so the answer is reproducible."""
    root.mkdir(parents=True)
    for name in LINKED:
        if (REPO_ROOT / name).exists():
            (root / name).symlink_to(REPO_ROOT / name)
    dist = root / "assistant_dists" / DIST
    shutil.copytree(REPO_ROOT / "assistant_dists" / DIST, dist)
    greedy = dist / "greedy_generative_config.json"
    greedy.write_text(json.dumps({"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 32}))
    (dist / "test.yml").write_text(textwrap.dedent(f"""\
        services:
          agent:
            environment:
              RESPONSE_TIME_LIMIT: "{ANSWER_TIMEOUT}"
              PARLEY_API_KEYS: {API_KEY}
          prompted-skill:
            environment:
              GENERATIVE_SERVICE_CONFIG: {greedy}
              GENERATIVE_TIMEOUT: "{ANSWER_TIMEOUT - 30}"
              PARLEY_API_KEYS: {API_KEY}
          transformers-lm-smollm2:
            environment:
              PARLEY_API_KEYS: {API_KEY}
        """))
    pipeline = json.loads((dist / "pipeline_conf.json").read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"]["timeout"] = ANSWER_TIMEOUT - 10
    (dist / "pipeline_conf.json").write_text(json.dumps(pipeline, indent=2))
    return root


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("browser")
    checkout = write_checkout(workdir / "checkout")
    with run_distribution(Repo(checkout), DIST, free_ports=True, overlays=["cpu.yml", "test.yml"],
                          state_dir=workdir / "state", startup_timeout=600) as running:
        yield running.url("agent")


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver are missing: run scripts/install-system-packages (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="parley-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=420,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def bot_turns(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#log .turn.bot:not(.pending)")


def key_asked(driver) -> bool:
    return driver.execute_script("return document.getElementById('key-dialog').open")


def key_refused(driver) -> bool:
    return driver.find_element(By.ID, "key-note").is_displayed()


def give_key(driver, key: str = API_KEY, *, refused: bool = False) -> None:
    """Wait for the page to ask for the key, give it, and wait until the page took it (the dialog
    closed) or, for a key the agent refuses, until it asks again, saying so. The dialog closes as
    soon as the key is given and opens again only when the agent's 401 is back, so a refusal is
    waited for as such, not as the dialog closing."""
    WebDriverWait(driver, 30).until(key_asked)
    field = driver.find_element(By.ID, "api-key")
    field.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()
    if refused:
        WebDriverWait(driver, 30).until(lambda d: key_asked(d) and key_refused(d))
    else:
        WebDriverWait(driver, 30).until(lambda d: not key_asked(d))


def test_a_person_asks_sees_the_answer_with_its_skill_and_finds_it_after_a_reload(agent_url, browser):
    browser.get(agent_url + "/")
    give_key(browser)  # asked once: the page's first request (the LLM list) got 401
    message = WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.ID, "message")))
    message.send_keys("What is the capital of France?", Keys.ENTER)  # Enter sends

    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: bot_turns(d) or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    answer = bot_turns(browser)[0]
    assert "Paris" in answer.text
    assert answer.find_element(By.CSS_SELECTOR, ".skill").text == "prompted_skill"
    assert " s" in answer.find_element(By.CSS_SELECTOR, ".meta").text  # its latency
    OUTPUT.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "chat.png"))

    browser.refresh()
    WebDriverWait(browser, 30).until(lambda d: bot_turns(d))
    assert not key_asked(browser)  # the tab kept its key
    users = browser.find_elements(By.CSS_SELECTOR, "#log .turn.user")
    assert [u.text for u in users] == ["What is the capital of France?"]
    assert "Paris" in bot_turns(browser)[0].text
    assert bot_turns(browser)[0].find_element(By.CSS_SELECTOR, ".skill").text == "prompted_skill"
    first_dialog = browser.find_element(By.ID, "dialog-id").text
    assert first_dialog.startswith("dialog ")

    # A second tab is another person: an empty page, then a dialog of its own, with a prompt and an
    # LLM of the person's choosing.
    browser.switch_to.new_window("tab")
    browser.get(agent_url + "/chat")
    give_key(browser)  # a new tab has its own sessionStorage: it asks again
    message = WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.ID, "message")))
    assert not bot_turns(browser) and not browser.find_elements(By.CSS_SELECTOR, "#log .turn.user")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#llm option")) > 1)
    llm = Select(browser.find_element(By.ID, "llm"))
    llm.select_by_index(1)
    chosen_llm = llm.first_selected_option.get_attribute("value")
    message.send_keys("Hello!", Keys.ENTER)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: bot_turns(d) or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    second_dialog = browser.find_element(By.ID, "dialog-id").text
    assert second_dialog.startswith("dialog ") and second_dialog != first_dialog
    assert [u.text for u in browser.find_elements(By.CSS_SELECTOR, "#log .turn.user")] == ["Hello!"]
    stored = requests.get(f"{agent_url}/api/dialogs/{second_dialog.removeprefix('dialog ')}", headers=AUTH, timeout=30).json()
    attributes = stored["human_utterances"][0]["attributes"]
    assert attributes["prompt"] == PROMPT and attributes["lm_service_url"] == chosen_llm
    assert stored["bot_utterances"][0]["active_skill"] == "prompted_skill"  # the skill took that LLM

    # "New dialog" closes it: an empty page, also after a reload.
    browser.find_element(By.ID, "new-dialog").click()
    WebDriverWait(browser, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#log .turn"))
    assert browser.find_element(By.ID, "dialog-id").text == ""
    browser.refresh()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .empty"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .turn")


def test_a_wrong_key_is_refused_and_asked_again_and_cancel_shows_the_agents_error(agent_url, browser):
    browser.get(agent_url + "/chat")
    give_key(browser, "not-the-key-0123456789", refused=True)  # refused: asked again, saying so
    assert "did not accept" in browser.find_element(By.ID, "key-note").text
    browser.find_element(By.ID, "key-cancel").click()
    WebDriverWait(browser, 30).until(lambda d: not key_asked(d))
    # the agent's 401 message, on the page (in the settings panel, folded: hence textContent)
    WebDriverWait(browser, 30).until(lambda d: "API key" in d.find_element(By.ID, "llm-note").get_attribute("textContent"))
    assert browser.execute_script("return sessionStorage.getItem('parley.apiKey')") is None
    assert browser.execute_script("return localStorage.length") == 0  # never kept beyond the tab

    browser.refresh()
    give_key(browser)
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#llm option")) > 1)
    assert browser.execute_script("return sessionStorage.getItem('parley.apiKey')") == API_KEY
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""  # not left in the page


def test_the_page_lists_the_distributions_llms_and_shows_errors_to_the_person(agent_url, browser):
    browser.get(agent_url + "/chat")
    give_key(browser)
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#llm option")) > 1)
    # (textContent: the options sit in the closed "Prompt and LLM" panel, so .text would be empty)
    names = [o.get_attribute("textContent") for o in browser.find_elements(By.CSS_SELECTOR, "#llm option")]
    assert any("transformers-lm-smollm2" in name for name in names), names

    # A message over the agent's limit: the agent's error is on the page, the text back in the box.
    browser.execute_script("document.getElementById('message').value = 'x'.repeat(5000);")
    browser.find_element(By.ID, "send").click()
    error = WebDriverWait(browser, 30).until(ec.visibility_of_element_located((By.ID, "error")))
    assert "payload" in error.text and "limit" in error.text
    assert len(browser.find_element(By.ID, "message").get_attribute("value")) == 5000


def test_the_page_fits_a_phone_screen_and_fetches_nothing_from_another_origin(agent_url, browser):
    # A phone: 360 CSS pixels wide (headless Chromium's window does not go below 500).
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True}
    )
    browser.get(agent_url + "/chat")
    give_key(browser)
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.ID, "message")))

    assert browser.execute_script("return window.innerWidth") == 360
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    for element_id in ("message", "send", "new-dialog"):
        box = browser.find_element(By.ID, element_id).rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (element_id, box)
    # Everything the page loaded came from the agent itself: no CDN, nothing from the internet.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded, "the page loads its script and style sheet"
    assert all(url.startswith(agent_url + "/") for url in loaded), loaded
