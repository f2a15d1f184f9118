"""The dashboard in a real headless chromium: live states, a killed backend, Drain by click."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from tests.integration.harness import Balancer, config
from tests.support import missing_tool

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "dashboard-test-token-5f2c9a"
WAIT = 15.0  # seconds any one thing may take to show on the page


def browser_problem(chromium: str = CHROMIUM, driver: str = CHROMEDRIVER) -> str | None:
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        return f"the dashboard browser test needs {' and '.join(missing)} (Debian: chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the dashboard browser test needs selenium (pip install selenium)"
    return None


def require_browser(chromium: str = CHROMIUM, driver: str = CHROMEDRIVER) -> None:
    """Skip when chromium, chromedriver or selenium is missing; under CI=true, install the
    Debian packages if we can, and fail rather than skip if that doesn't fix it."""
    problem = browser_problem(chromium, driver)
    if problem is None:
        return
    ci = os.environ.get("CI", "").lower() == "true"
    if ci and "selenium" not in problem and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
            env=env,
            timeout=600,
            check=False,
        )
        problem = browser_problem(chromium, driver)
        if problem is None:
            return
    missing_tool(problem)


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_missing_browser_skips_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    # no apt-get on PATH: under CI the install attempt is skipped and the failure stands
    monkeypatch.setenv("PATH", str(tmp_path))
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected, match="needs"):
        require_browser(chromium=str(tmp_path / "chromium"), driver=str(tmp_path / "driver"))


def start_chrome(tmp: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chrome-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


def row_states(driver) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """backend name -> the state text its row shows."""
    rows = driver.find_elements("css selector", 'section[data-pool="web"] tr[data-backend]')
    return {
        r.get_attribute("data-backend"): r.find_element("css selector", ".state").text.lower()
        for r in rows
    }


def wait_states(driver, want: dict[str, str], what: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
            lambda d: all(row_states(d).get(k) == v for k, v in want.items())
        )
    except Exception as e:
        raise AssertionError(f"{what}: page shows {row_states(driver)}, wanted {want}") from e


def admin_status(lb: Balancer) -> dict:
    code, body = lb.admin("/status", token=TOKEN)
    assert code == 200, body
    return body  # type: ignore[return-value]


@pytest.mark.browser
@pytest.mark.timeout(900)  # room for the CI-only package install; the test itself takes ~15 s
def test_dashboard_shows_a_killed_backend_down_and_drains_one_by_click(procs, tmp_path):
    require_browser()
    from selenium.webdriver.support.ui import WebDriverWait

    ports = {}
    pids = {}
    for name in ("app1", "app2", "app3"):
        ports[name] = procs.demo_backend(name)
        pids[name] = procs.procs[-1].pid
    cfg = config(
        list(ports.items()),
        pool={"health_check": {"interval": "300ms", "timeout": "300ms", "rise": 1, "fall": 2}},
    )
    cfg["admin"]["token"] = TOKEN  # the page must work with a token, from its URL fragment
    lb = procs.balancer(cfg)
    # light client traffic the whole time, so the page has request rates to show
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        with requests.Session() as s:
            while not stop.wait(0.02):
                try:
                    s.get(f"{lb.url}/echo", timeout=5)
                except requests.RequestException as e:
                    failures.append(repr(e))

    traffic = threading.Thread(target=client, daemon=True)
    traffic.start()
    driver = start_chrome(tmp_path)
    try:
        driver.get(f"http://127.0.0.1:{lb.admin_port}/#token={TOKEN}")
        wait_states(driver, {"app1": "up", "app2": "up", "app3": "up"}, "all backends up")
        # the token left the address bar (it stays in this tab's sessionStorage)
        assert TOKEN not in driver.current_url
        assert driver.find_element("id", "livetext").text.startswith("live")

        os.kill(pids["app3"], signal.SIGKILL)
        wait_states(driver, {"app3": "down", "app1": "up", "app2": "up"}, "killed app3 shown down")
        row3 = driver.find_element("css selector", 'tr[data-backend="app3"]')
        assert row3.get_attribute("data-state") == "down"

        row2 = driver.find_element("css selector", 'tr[data-backend="app2"]')
        row2.find_element("css selector", 'button[data-action="drain"]').click()
        wait_states(driver, {"app2": "draining"}, "app2 drained by a click")
        states = {b["name"]: b["state"] for b in admin_status(lb)["pools"]["web"]["backends"]}
        assert states == {"app1": "up", "app2": "draining", "app3": "down"}
        # the Drain button of a draining backend is disabled, Enable is offered
        assert not row2.find_element("css selector", 'button[data-action="drain"]').is_enabled()
        assert row2.find_element("css selector", 'button[data-action="enable"]').is_enabled()
        # the recent errors panel saw app3 go down
        errors = driver.find_element("id", "errors").text
        assert "app3" in errors and "health down" in errors, errors
        # app1 serves the traffic now: the page computes its rate from successive counts
        rate = driver.find_element("css selector", 'tr[data-backend="app1"] td.rate')
        WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
            lambda d: rate.text not in ("", "…") and float(rate.text) > 0
        )
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        # nothing went wrong in the page's own script (CSP violations would show here too)
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()
        stop.set()
        traffic.join(10)
    assert failures == []
