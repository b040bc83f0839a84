"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium pointed at the
system driver, so that nothing is downloaded): it loads, a prompt + Generate shows previews and then the image,
Cancel stops a long run, an invalid size shows the server's message. .ci/run installs the browser."""

import json
import shutil
import tempfile
import time

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_server import Server

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="no browser: apt-get install chromium chromium-driver (.ci/run does)")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--memory", "resident")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def fill(driver, **values):
    for name, value in values.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(str(value))


def wait(driver, condition, seconds=60, what=""):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"{what}: status {driver.find_element(By.ID, 'status').text!r}, "
                             f"error {driver.find_element(By.ID, 'error').text!r}") from None


def shown(driver, element_id):
    element = driver.find_element(By.ID, element_id)
    return element.is_displayed() and element.get_attribute("src").startswith("data:image/png;base64,")


def test_generate_shows_previews_then_the_image(server, browser):
    browser.get(f"http://127.0.0.1:{server.port}/")
    assert browser.title == "mlx-glm-image"
    wait(browser, lambda d: d.find_element(By.ID, "model").text, 10, "the model's name")
    fill(browser, prompt='a red cat "big"', width=96, height=64, steps=40, guidance=1.5)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: shown(d, "result"), what="the image")
    assert browser.find_element(By.ID, "canvas").get_attribute("data-previews") == "3", "three previews came first"
    assert not browser.find_element(By.ID, "preview").is_displayed(), "the image replaces the preview"
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("done: 96x64, seed "), status
    assert browser.find_element(By.ID, "download").get_attribute("href").startswith("data:image/png;base64,")
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert len(cards) == 1 and "96x64, 40 steps" in cards[0].text
    seed = status.rsplit(" ", 1)[1]
    cards[0].find_element(By.TAG_NAME, "button").click()  # use these settings
    assert browser.find_element(By.ID, "seed").get_attribute("value") == seed
    assert not browser.find_element(By.ID, "random-seed").is_selected()


def test_cancel_stops_a_long_run(server, browser):
    browser.get(f"http://127.0.0.1:{server.port}/")
    fill(browser, prompt="a cat", width=128, height=128, steps=1000)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "denoising: step" in d.find_element(By.ID, "status").text, what="the denoising")
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "cancelled", 10, "cancelled")
    t0 = time.time()
    fill(browser, width=64, height=64, steps=2)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("done: 64x64"), 30,
         "the next image, after the cancelled run freed the server")
    assert time.time() - t0 < 30


def test_an_invalid_size_shows_the_servers_message(server, browser):
    browser.get(f"http://127.0.0.1:{server.port}/")
    fill(browser, prompt="a cat", width=100, height=64, steps=2)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "error").text, 10, "the error")
    assert "height and width must be positive multiples of 32, got 100x64" in browser.find_element(By.ID, "error").text


def test_a_seed_goes_as_its_digits_and_abc_is_refused(server, browser):
    """A seed past 2^53 comes back as typed (a JS number rounds it: 2^53 + 1 was sent as 2^53); "abc" is refused
    in the page, not sent as null and silently replaced by a random seed."""
    browser.get(f"http://127.0.0.1:{server.port}/")
    fill(browser, prompt="a cat", width=64, height=64, steps=2)
    browser.find_element(By.ID, "random-seed").click()
    fill(browser, seed="abc")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "error").text, 10, "the seed's message")
    assert browser.find_element(By.ID, "error").text.startswith('The seed must be a whole number (0 to 2^64 - 1), not "abc"')
    assert browser.find_element(By.ID, "status").text == "" and not browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    seed = 2**53 + 1
    fill(browser, seed=f"00{seed}")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("done: "), what="the image")
    assert browser.find_element(By.ID, "status").text == f"done: 64x64, seed {seed}"
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert f"seed {seed}" in card.text
    card.find_element(By.TAG_NAME, "button").click()  # use these settings
    assert browser.find_element(By.ID, "seed").get_attribute("value") == str(seed)


def test_an_emptied_size_is_the_default_size_or_a_message(server, browser):
    """Both boxes empty: "auto" (the server's default size, or the first condition image's); one empty: a message.
    Once "NaNxNaN" went to the server."""
    browser.get(f"http://127.0.0.1:{server.port}/")
    fill(browser, prompt="a cat", steps=2)
    browser.find_element(By.ID, "width").clear()
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "error").text, 10, "the size's message")
    assert browser.find_element(By.ID, "error").text == "Give both width and height, or leave both empty for the default size."
    browser.find_element(By.ID, "height").clear()
    browser.execute_script("""  // the body the page sends, answered here (a 1024x1024 image is not needed to see it)
        window.sent = [];
        const real = window.fetch;
        window.fetch = (url, options) => {
          if (!String(url).includes("/images/")) return real(url, options);
          window.sent.push(options.body);
          return Promise.resolve(new Response(JSON.stringify({ error: { message: "answered by the test" } }), { status: 400 }));
        };""")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "error").text == "answered by the test", 10, "the stubbed answer")
    assert json.loads(browser.execute_script("return window.sent[0]"))["size"] == "auto"
