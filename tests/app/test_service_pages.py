"""The pages work with no internet: /docs and the job page at / load every asset from
the service, and render in a real headless chromium whose network is cut off.

The browser tests drive Debian's chromium over the DevTools protocol (tests/app/browser.py)
against a real uvicorn server; they are skipped when chromium is not installed, except in CI
(.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from tests.app.browser import CHROMIUM, Browser
from tests.app.conftest import assert_problem, tiny_state_dict

_REPO = Path(__file__).resolve().parents[2]
_KEY = "browser-test-key"
_PAGES = ("/", "/docs")
_ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
_ABSOLUTE_URL = re.compile(r"""\b(?:https?:)?//[A-Za-z0-9.-]+""")
# Skipped on a developer's machine without chromium; in CI (.ci/run installs it) never skipped.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (apt-get install chromium)"
)


# -- without a browser: what the pages reference -----------------------------------------------
def _own_assets(http, page: str) -> list[str]:
    html = http.get(page).text
    return [urljoin(f"http://testserver{page}", ref) for ref in _ASSET.findall(html) if not ref.startswith("data:")]


@pytest.mark.parametrize("page", _PAGES)
def test_pages_reference_only_the_services_own_assets(paused_service, page):
    response = paused_service.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert _ABSOLUTE_URL.findall(response.text) == []  # no CDN, no font service, no other host
    assets = _own_assets(paused_service, page)
    assert assets, "the page loads no script or style at all?"
    for asset in assets:
        assert asset.startswith("http://testserver/"), asset
        assert paused_service.get(asset).status_code == 200, asset


def test_the_job_pages_own_files_name_no_other_host(paused_service):
    for name in ("job-page.js", "job-page.css"):
        response = paused_service.get(f"/assets/app/{name}")
        assert response.status_code == 200
        assert _ABSOLUTE_URL.findall(response.text) == [], name


def test_pages_are_out_of_the_api_schema_and_redoc_is_off(paused_service):
    paths = paused_service.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc", "/docs/oauth2-redirect"} & set(paths)
    # ReDoc's bundle always fetches its vendor's logo from a CDN: not served at all
    assert_problem(paused_service.get("/redoc"), 404, "not-found-error")
    assert paused_service.get("/docs/oauth2-redirect").status_code == 200


# -- a real server and a real browser ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Iterator[str]:
    """uvicorn serving the app with one API key (and trusted inputs, for the slow test job)."""
    data_dir = tmp_path_factory.mktemp("pages")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(_REPO),
        "MONOQUANT_DATA_DIR": str(data_dir),
        "MONOQUANT_API_KEYS": _KEY,
        "MONOQUANT_DISPATCH_INTERVAL_S": "0.05",
        "MONOQUANT_TRUSTED_INPUTS": "true",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([*command, "--host", "127.0.0.1"], cwd=_REPO, env=env, stdout=log, stderr=log)
    origin = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{origin}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((data_dir / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    try:
        yield origin
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _api(origin: str) -> httpx.Client:
    return httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {_KEY}"}, timeout=30)


def _wait_done(api: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished_job(live_server, tmp_path_factory) -> dict:
    """A real job run through the API: a tiny safetensors MLP, int8 dynamic."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("page-model") / "tiny.safetensors"
    save_file(tiny_state_dict(), str(path))
    with _api(live_server) as api:
        submitted = api.post(
            "/v1/quantize",
            files={"model": ("tiny.safetensors", path.read_bytes())},
            data={"bits": "8", "dynamic": "true"},
        )
        assert submitted.status_code == 202, submitted.text
        job = _wait_done(api, submitted.json()["id"])
        assert job["status"] == "succeeded", job
        job["report"] = api.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    return job


def _only_the_service_was_asked(browser: Browser, origin: str) -> None:
    outside = [url for url in browser.requests if not url.startswith((origin + "/", "data:", "blob:"))]
    assert outside == [], f"the page asked other hosts: {outside}"
    assert not [url for url in browser.requests if _KEY in url], "the API key went into a URL"
    # and the network really is cut off: had the page needed a CDN, it could not have rendered
    reached = browser.evaluate(
        "fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css').then(() => 'reached', () => 'failed')"
    )
    assert reached == "failed"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser() as running:
        yield running


@pytest.mark.slow
@needs_chromium
def test_swagger_ui_shows_every_operation_offline(live_server, browser):
    spec = httpx.get(f"{live_server}/openapi.json").json()
    expected = {
        f"operations-{operation['tags'][0]}-{operation['operationId']}"
        for methods in spec["paths"].values()
        for operation in methods.values()
    }
    browser.open(f"{live_server}/docs")
    shown = set(
        browser.wait_for(
            f"(() => {{ const ids = [...document.querySelectorAll('.opblock[id]')].map(e => e.id);"
            f" return ids.length >= {len(expected)} && ids; }})()"
        )
    )
    assert expected <= shown, f"missing from /docs: {sorted(expected - shown)}"
    assert browser.evaluate("document.body.innerText").count("Unable to render") == 0
    _only_the_service_was_asked(browser, live_server)
    assert f"{live_server}/assets/docs/swagger-ui-bundle.js" in browser.requests


def _type_key(browser: Browser) -> None:
    browser.wait_for("document.getElementById('key-form') !== null")
    browser.evaluate(
        f"document.getElementById('api-key').value = {json.dumps(_KEY)};"
        "document.getElementById('key-form').requestSubmit(); true"
    )


@pytest.mark.slow
@needs_chromium
def test_job_page_shows_a_finished_jobs_report_offline(live_server, finished_job, browser):
    job_id = finished_job["id"]
    browser.open(f"{live_server}/")
    assert browser.wait_for("document.getElementById('list-message').textContent").startswith(
        "This server needs an API key"
    )
    _type_key(browser)
    assert browser.evaluate("sessionStorage.getItem('monoquant.apiKey')") == _KEY
    browser.wait_for(f"document.querySelector('tr[data-job-id=\"{job_id}\"]') !== null")
    browser.evaluate(f"document.querySelector('tr[data-job-id=\"{job_id}\"]').click(); true")
    browser.wait_for(f"document.getElementById('report').dataset.jobId === {json.dumps(job_id)}")

    metrics, validation = finished_job["metrics"], finished_job["report"]["validation"]
    sizes = browser.evaluate("document.getElementById('sizes').innerText")
    assert f"{metrics['original_size_bytes']:,} bytes" in sizes
    assert f"{metrics['quantized_size_bytes']:,} bytes" in sizes
    assert f"{metrics['compression_ratio']:.2f}x" in sizes
    bars = browser.evaluate(
        "[...document.querySelectorAll('#sqnr-chart svg rect.bar')].map(b => [b.dataset.layer, +b.dataset.sqnrDb])"
    )
    assert validation["layer_sqnr_db"], "the report has no per-layer SQNR to draw"
    assert dict(bars) == pytest.approx(validation["layer_sqnr_db"])
    accuracy = browser.evaluate("document.getElementById('accuracy').innerText")
    assert f"Mean weight SQNR\n{validation['mean_weight_sqnr_db']:.2f} dB" in accuracy
    assert f"Min weight SQNR\n{validation['min_weight_sqnr_db']:.2f} dB" in accuracy
    # a state_dict has no forward: no output figures, said as such
    assert validation["output_sqnr_db"] is None
    assert "Output SQNR\nnot measured" in accuracy
    assert "Perplexity" not in accuracy and "Measured on" not in accuracy  # no text, no text rows
    assert ("Validation\npassed" if validation["passed"] else "Validation\nfailed") in accuracy

    listed = browser.evaluate(
        "[...document.querySelectorAll('#artifacts li')].map(li => [li.dataset.artifact, li.innerText])"
    )
    assert [name for name, _ in listed] == [a["name"] for a in finished_job["artifacts"]]
    for (_, text), artifact in zip(listed, finished_job["artifacts"], strict=True):
        assert artifact["sha256"] in text
    # a download is fetched with the key, then saved from a blob: capture what would be saved
    saved = browser.evaluate(
        """new Promise((resolve) => {
            const click = HTMLAnchorElement.prototype.click;
            HTMLAnchorElement.prototype.click = function () {
                if (!this.href.startsWith("blob:")) return click.call(this);
                fetch(this.href).then((r) => r.text()).then((text) => resolve([this.download, text.length]));
            };
            document.querySelector('#artifacts a[data-artifact="report.json"]').click();
        })"""
    )
    report_size = next(a["size"] for a in finished_job["artifacts"] if a["name"] == "report.json")
    assert saved == ["report.json", report_size]
    _only_the_service_was_asked(browser, live_server)


@pytest.mark.slow
@needs_chromium
def test_job_page_follows_a_running_job_live(live_server, slow_job, browser):
    files, data = slow_job
    with _api(live_server) as api:
        job_id = api.post("/v1/quantize", files=files, data=data).json()["id"]
        browser.open(f"{live_server}/#job={job_id}")
        _type_key(browser)
        # progress arrives over the event stream while the job calibrates (about 10 s)
        browser.wait_for("document.getElementById('progress-text').textContent.startsWith('calibrate')", 90)
        browser.wait_for(f"document.getElementById('report').dataset.jobId === {json.dumps(job_id)}", 120)
        assert _wait_done(api, job_id)["status"] == "succeeded"
    stream = [url for url in browser.requests if url.endswith(f"/v1/jobs/{job_id}/events")]
    assert stream, "the page did not follow the job's events"
    _only_the_service_was_asked(browser, live_server)
