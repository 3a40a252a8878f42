"""The page of `hierloc serve` in a real browser: headless Chromium opens it on 127.0.0.1, uploads a real photo, and
finds the country, the concepts, the map and the photo's EXIF position; on a phone's width the map is drawn for that
width and fits the page; an unreadable file shows the server's error. Each page is left as a screenshot in the
test's temporary directory.

Skips with the reason when selenium, Chromium or chromedriver is missing (CI installs Debian's `chromium` and
`chromium-driver`) or when the reference photos beside the repository are absent.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="uvicorn is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.helpers import SHARED_DATA  # noqa: E402

PHOTOS = SHARED_DATA / "photos"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PAGE_WAIT_S = 120
DESKTOP, PHONE = (1280, 1600), (390, 3200)      # window sizes (the phone's tall enough to show the whole page)

# a server on a trained tiny model and a headless browser
pytestmark = pytest.mark.integration


def _executables() -> tuple[str, str]:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def _photo() -> Path:
    photos = sorted((PHOTOS / "exif").glob("*.jpg"))
    if not photos:
        pytest.skip(f"reference photos {PHOTOS / 'exif'} are absent")
    return photos[0]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """`hierloc serve`'s app on 127.0.0.1 (a free port), in a thread of this process."""
    import uvicorn

    from hierloc.inference.predictor import HierLoc
    from hierloc.serve.app import create_app

    model = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    config = uvicorn.Config(create_app(model, tiny_model_dir), host="127.0.0.1", port=0, log_level="warning",
                            access_log=False)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield model, f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _executables()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def _upload(browser, url: str, path: Path) -> None:
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))


def _map_size(browser) -> list[int]:
    """[naturalWidth, naturalHeight] of the map once it is loaded."""
    return WebDriverWait(browser, PAGE_WAIT_S).until(lambda d: d.execute_script(
        "const m = document.getElementById('map'); return m.complete && m.naturalWidth ? "
        "[m.naturalWidth, m.naturalHeight] : null;"))


def test_a_dropped_photo_shows_its_country_concepts_map_and_exif_position(server, browser, tiny_model_dir,
                                                                          tmp_path):
    from hierloc.data.exif import read_gps
    from hierloc.inference import explain

    model, url = server
    photo = _photo()
    expected = explain.explain_images(model, [str(photo)], model_dir=tiny_model_dir)[0]
    _upload(browser, url, photo)
    wait = WebDriverWait(browser, PAGE_WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    country = browser.find_element(By.CSS_SELECTOR, "#hierarchy li.level-country .entity").text
    assert country == expected.levels[0].chosen.name
    shown = [li.find_element(By.CLASS_NAME, "entity").text
             for li in browser.find_elements(By.CSS_SELECTOR, "#hierarchy > li")]
    assert shown == [level.chosen.name for level in expected.levels]
    concepts = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#concepts li.concept")]
    assert expected.image_concepts and [c.rsplit(" ", 1)[0] for c in concepts] == [
        c["name"] for c in expected.image_concepts]
    map_size = _map_size(browser)
    assert map_size[0] == 900 and map_size[1] > 200
    gps = read_gps(photo)
    exif = browser.find_element(By.ID, "exif")
    assert exif.is_displayed() and f"{gps.lat_deg:.4f}" in exif.text and f"{gps.lon_deg:.4f}" in exif.text
    assert country in browser.find_element(By.ID, "status").text
    assert "gazetteer" in browser.find_element(By.ID, "provenance").text
    browser.save_screenshot(str(tmp_path / f"page-{DESKTOP[0]}.png"))


def test_on_a_phone_the_map_is_drawn_for_the_page_width_and_fits_it(server, browser, tmp_path):
    """At 390 px the page asks for a map as wide as its column (its text then keeps its size instead of shrinking
    to 40 % of the 900 px map's) and nothing runs off the side of the page."""
    _model, url = server
    photo = _photo()
    browser.set_window_size(*PHONE)
    try:
        _upload(browser, url, photo)
        WebDriverWait(browser, PAGE_WAIT_S).until(
            lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        natural_width, _ = _map_size(browser)
        left, right, shown_width, page_width, scroll_width = browser.execute_script(
            "const r = document.getElementById('map').getBoundingClientRect(); return [r.left, r.right, r.width, "
            "document.documentElement.clientWidth, document.documentElement.scrollWidth];")
        browser.save_screenshot(str(tmp_path / f"page-{PHONE[0]}.png"))
        browser.find_element(By.ID, "map").screenshot(str(tmp_path / f"map-{PHONE[0]}.png"))
        assert 300 <= natural_width <= page_width
        assert abs(shown_width - 2 - natural_width) <= 1          # shown at its own size (plus its border)
        assert 0 <= left and right <= page_width and scroll_width <= page_width
    finally:
        browser.set_window_size(*DESKTOP)


def test_an_unreadable_file_shows_the_servers_error_on_the_page(server, browser, tmp_path):
    _model, url = server
    _executables()
    _photo()                                   # the same preconditions as the photo test
    fake = tmp_path / "holiday.jpg"
    fake.write_text("not a photo at all\n", encoding="utf-8")
    _upload(browser, url, fake)
    error = WebDriverWait(browser, PAGE_WAIT_S).until(
        lambda d: d.find_element(By.ID, "error").text or None)
    assert "holiday.jpg" in error and "not a recognised image file" in error
    assert not browser.find_element(By.ID, "result").is_displayed()
