"""The course in a real browser: JupyterLab on the loopback address, driven by headless Chromium.

What a student does, checked end to end:

1. open a course notebook (a byte-identical copy of ``notebooks/06_benchmarks.ipynb``): JupyterLab must not mark
   it modified and must not rewrite it, so ``git status`` stays clean after merely opening the course;
2. open a notebook with the speed-up explorer, run its cells, move a slider and see the plot redraw;
3. keep a screenshot of the result (under the test's temporary folder).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them with apt-get when they are missing)
and the ``selenium`` package (dev extra). Without them the test is skipped, saying which one is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdlib import paths

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
COURSE_NOTEBOOK = "06_benchmarks.ipynb"


def _missing() -> str | None:
    if not CHROMIUM:
        return "no Chromium installed (Debian: apt-get install chromium chromium-driver; .ci/run does this)"
    if not CHROMEDRIVER:
        return "no chromedriver installed (Debian: apt-get install chromium-driver; .ci/run does this)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _explorer_notebook(path: Path) -> None:
    """A two-cell notebook: the course's setup call, then 06's speed-up explorer at fixed starting values."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from qdlib.notebook import setup\nsetup()"),
                nbformat.v4.new_code_cell("from qdlib.viz import speedup_explorer\n"
                                          "speedup_explorer(alpha=0.8, c=0.3, gamma=4, verify_cost=1.2)")]
    nb.metadata = json.loads((paths.REPO_DIR / "notebooks" / COURSE_NOTEBOOK).read_text())["metadata"]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server (token-protected, loopback only) whose root is a temporary folder."""
    why = _missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("lab-home")  # settings, workspaces and runtime files stay out of the user's home
    shutil.copy(paths.REPO_DIR / "notebooks" / COURSE_NOTEBOOK, root / COURSE_NOTEBOOK)
    _explorer_notebook(root / "explorer.ipynb")
    port, token = _free_port(), "qd-browser-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "QD_RUNS": str(home / "runs"), "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}", "--ServerApp.allow_remote_access=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers run as root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is not None or _responds(f"{url}/api/status?token={token}"), 120,
                  "JupyterLab did not start", home / "lab.log")
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {proc.returncode}: {(home / 'lab.log').read_text()[-2000:]}")
        yield {"url": url, "token": token, "root": root, "log": home / "lab.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _responds(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_for(cond, seconds: float, what: str, log: Path | None = None):
    end = time.time() + seconds
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise AssertionError(f"{what} within {seconds} s{': ' + tail if tail else ''}")


@pytest.fixture(scope="module")
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={lab['root'].parent / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, lab, name: str) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel is idle."""
    driver.get(f"{lab['url']}/lab/tree/{name}?token={lab['token']}")
    _wait_for(lambda: driver.find_elements("css selector", ".jp-NotebookPanel .jp-Cell"), 120,
              f"{name} did not open in JupyterLab", lab["log"])
    time.sleep(2)
    # Opened straight from a URL while JupyterLab is still loading its kernel list, a notebook may ask which kernel
    # to start (the one its metadata names is preselected); accept it, as a student would.
    for dialog in driver.find_elements("css selector", ".jp-Dialog .jp-mod-accept"):
        dialog.click()
    _wait_for(lambda: _kernel_idle(driver), 120, f"the kernel of {name} did not become idle", lab["log"])


def _kernel_idle(driver) -> bool:
    status = driver.find_elements("css selector", ".jp-NotebookPanel:not(.lm-mod-hidden) [data-status]")
    return any(s.get_attribute("data-status") == "idle" for s in status)


def _dirty(driver) -> bool:
    return bool(driver.find_elements("css selector", ".jp-mod-current.jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty"))


def test_opening_a_course_notebook_changes_nothing(lab, browser):
    path = lab["root"] / COURSE_NOTEBOOK
    before = path.read_bytes()
    _open(browser, lab, COURSE_NOTEBOOK)
    time.sleep(3)  # time for a kernelspec rewrite or widget restore to mark the document dirty
    assert not _dirty(browser), "JupyterLab marked the freshly opened course notebook as modified"
    # saving the unmodified notebook must write back the same bytes (the committed metadata is JupyterLab's own)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.find_element("css selector", ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").click()
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    time.sleep(3)
    after = path.read_bytes()
    assert after == before, _first_difference(before, after)
    assert not browser.find_elements("css selector", ".jp-OutputArea-output pre") or \
        not any("VBox(children=" in e.text for e in browser.find_elements("css selector", ".jp-OutputArea-output pre")), \
        "a widget shows as a bare repr in the opened notebook"


def _first_difference(a: bytes, b: bytes) -> str:
    la, lb = a.decode().splitlines(), b.decode().splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"saving from JupyterLab rewrote the notebook: line {i + 1} {x!r} became {y!r}"
    return f"saving from JupyterLab rewrote the notebook: {len(la)} lines became {len(lb)}"


def _plot(driver):
    """The explorer's picture (an ipywidgets Image) in the visible notebook, or None."""
    imgs = driver.find_elements("css selector", ".jp-NotebookPanel:not(.lm-mod-hidden) img.widget-image")
    return imgs[-1] if imgs and imgs[-1].size["height"] > 50 else None


def _menu(driver, menu: str, item: str) -> None:
    """Click ``item`` in JupyterLab's ``menu`` of the menu bar."""
    driver.find_element("xpath", f"//div[contains(@class, 'lm-MenuBar-itemLabel')][text()='{menu}']").click()
    _wait_for(lambda: driver.find_elements("xpath", f"//div[contains(@class, 'lm-Menu-itemLabel')][text()='{item}']"),
              10, f"no {item!r} in the {menu} menu")[0].click()


def test_the_speedup_explorer_redraws_its_plot_when_a_slider_moves(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(browser, lab, "explorer.ipynb")
    _menu(browser, "Run", "Run All Cells")
    sliders = _wait_for(lambda: browser.find_elements("css selector", ".widget-slider .noUi-handle"), 120,
                        "the explorer's sliders did not appear", lab["log"])
    picture = _wait_for(lambda: _plot(browser), 60, "the explorer drew no plot", lab["log"])
    before_src, before_png = picture.get_attribute("src"), picture.screenshot_as_png
    assert len(sliders) >= 3, f"expected sliders for alpha, c, gamma and the verification cost, found {len(sliders)}"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", sliders[0])
    for _ in range(10):  # alpha up by 0.10, as a student moving the slider with the keyboard
        ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    _wait_for(lambda: (p := _plot(browser)) is not None and p.get_attribute("src") != before_src, 60,
              "moving the alpha slider did not redraw the plot", lab["log"])
    time.sleep(0.5)
    assert _plot(browser).screenshot_as_png != before_png, "the plot was redrawn but looks the same"
    line = browser.find_elements("css selector", ".jp-NotebookPanel:not(.lm-mod-hidden) .widget-html")[-1].text
    assert line.startswith("alpha 0.90,"), f"the line under the plot does not follow the slider: {line!r}"
    shot = lab["root"] / "explorer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
