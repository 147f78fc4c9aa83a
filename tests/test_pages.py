"""The playground (`GET /`) and analytics (`GET /analytics`) pages of `engine serve`.

Fast checks (no browser): the analytics figures from job records, the job store's start times (and the column added
to an older store), the page routes' headers, static files and auth, the package data. Then, in a real headless
browser (Debian's `chromium` driven by Playwright through its executable path; Playwright's own browser download is
never used), against a real `engine serve --api-key` with tiny models: the login, the form of every endpoint built
from its schema, a run with progress, previews and the image, the snippets, a 422 beside its field, an upload for
AuraSR, the analytics page with the runs just made, a phone-width screen, no CSP violation and no request leaving
the server. Screenshots of each step go to `$ENGINE_TEST_ARTIFACTS/pages/` (default: a temporary folder, printed).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from engine.endpoints import ENDPOINTS
from engine.runtime.jobstore import JobStore, JobTiming
from engine.server.analytics import BUCKETS, Window, build_analytics, percentiles

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "engine" / "server" / "static"
API_KEY = "page-test-key"


# -- analytics figures -----------------------------------------------------------------------------------------------
def _timing(i: int, app: str, created: float, wait: float | None, run: float | None,
            error_type: str | None = None) -> JobTiming:
    started = created + wait if wait is not None else None
    finished = started + run if (started is not None and run is not None) else None
    return JobTiming(f"job{i}", app, "COMPLETED" if finished is not None else "IN_QUEUE", created, started, finished,
                     error_type, f"boom {i}" if error_type else None)


def test_analytics_counts_percentiles_errors_and_series() -> None:
    now = 10_000.0
    window = Window.last(600, now=now)
    rng = np.random.default_rng(0)
    waits, runs = rng.uniform(0, 2, 40), rng.uniform(0.5, 5, 40)
    jobs = [_timing(i, "fal-ai/fast-sdxl", now - 500 + 10 * i, float(waits[i]), float(runs[i]),
                    "timeout" if i % 10 == 3 else "cancelled" if i == 7 else None) for i in range(40)]
    jobs.append(_timing(99, "fal-ai/fast-sdxl", now - 5, None, None))  # still queued
    jobs.append(_timing(100, "fal-ai/fast-sdxl", now - 5000, 0.1, 0.1))  # before the window
    body = build_analytics(jobs, window, ["fal-ai/fast-sdxl", "fal-ai/aura-sr"])
    sdxl, aura = body["endpoints"]["fal-ai/fast-sdxl"], body["endpoints"]["fal-ai/aura-sr"]
    assert aura["requests"] == 0 and aura["success_rate"] is None and aura["latency_s"]["p50"] is None
    assert sdxl["requests"] == 41 and sdxl["completed"] == 40 and sdxl["in_flight"] == 1
    assert sdxl["failed"] == 5 and sdxl["succeeded"] == 35 and sdxl["success_rate"] == pytest.approx(35 / 40)
    assert sdxl["errors_by_type"] == {"timeout": 4, "cancelled": 1}
    latencies = waits + runs
    for p in (50, 75, 90, 99):
        assert sdxl["latency_s"][f"p{p}"] == pytest.approx(np.percentile(latencies, p))
        assert sdxl["queue_wait_s"][f"p{p}"] == pytest.approx(np.percentile(waits, p))
    assert sdxl["latency_s"]["p50"] < sdxl["latency_s"]["p90"] < sdxl["latency_s"]["p99"]
    assert [f["request_id"] for f in sdxl["recent_failures"]] == ["job33", "job23", "job13", "job7", "job3"]
    assert sdxl["recent_failures"][0] == {"request_id": "job33", "submitted_at": now - 500 + 330,
                                          "error_type": "timeout", "error": "boom 33"}
    series = sdxl["series"]
    assert len(series["t"]) == BUCKETS and sum(series["requests"]) == 41 and sum(series["failures"]) == 5
    assert body["window"]["seconds"] == 600 and body["percentiles"] == ["p50", "p75", "p90", "p99"]


def test_percentiles_of_nothing_and_of_one_value() -> None:
    assert percentiles([]) == {"p50": None, "p75": None, "p90": None, "p99": None}
    assert percentiles([2.5]) == {"p50": 2.5, "p75": 2.5, "p90": 2.5, "p99": 2.5}


def test_job_store_records_start_times_and_adds_the_column_to_an_older_store(tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(str(old / "jobs.sqlite3"))  # the first release's table: no started_at
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, app_id TEXT NOT NULL, state TEXT NOT "
               "NULL, created_at REAL NOT NULL, finished_at REAL, inference_time REAL, record TEXT, meta TEXT NOT "
               "NULL DEFAULT '{}', result TEXT, error TEXT, logs TEXT NOT NULL DEFAULT '[]', files TEXT NOT NULL "
               "DEFAULT '[]', bytes INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO jobs (id, seq, app_id, state, created_at, finished_at) VALUES ('a', 1, 'x', "
               "'COMPLETED', 100, 103)")
    db.commit()
    db.close()
    store = JobStore(old)
    try:
        assert store.timings_since(0) == [JobTiming("a", "x", "COMPLETED", 100.0, None, 103.0, None, None)]
        before = time.time()
        store.add("b", "y", record=None, meta={}, created_at=before)
        store.started("b")
        store.finished("b", result=None, error={"message": "no", "error_type": "cancelled"}, logs=[], files=[],
                       inference_time=None, result_json=None, nbytes=0)
        (b,) = store.timings_since(before)
        assert b.id == "b" and b.state == "COMPLETED" and before <= b.started_at <= b.finished_at <= time.time()
        assert (b.error_type, b.error) == ("cancelled", "no")
    finally:
        store.close()


# -- routes, without a browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from engine.server import create_app

    class NoModels:  # the page routes never run a model; the queue needs only a device name
        device = "cpu"

        def loaded_models(self) -> list[str]:
            return []

    with TestClient(create_app(NoModels(), api_key=API_KEY)) as c:
        yield c


def test_pages_are_open_static_files_with_a_strict_csp(client) -> None:
    for path, title in (("/", "playground"), ("/analytics", "analytics")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert f"engine · {title}" in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    r = client.get("/ui/static/vendor/uPlot.iife.min.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    for bad in ("/ui/static/nope.js", "/ui/static/../pages.py", "/ui/static/%2e%2e/pages.py", "/ui/static/"):
        r = client.get(bad)
        assert r.status_code in (404, 405) and "__future__" not in r.text, bad  # 405: the client cut `..` first


def test_page_data_needs_the_key_and_serves_every_endpoint_schema(client) -> None:
    for path in ("/ui/api/endpoints", "/ui/api/analytics", "/ui/api/report?app=fal-ai/fast-sdxl"):
        assert client.get(path).status_code == 401, path
    key = {"Authorization": f"Key {API_KEY}"}
    body = client.get("/ui/api/endpoints", headers=key).json()
    served = {e["app_id"]: e for e in body["endpoints"]}
    assert set(served) == set(ENDPOINTS)
    for app_id, spec in ENDPOINTS.items():
        assert served[app_id]["input_schema"] == spec.schema.model_json_schema(mode="validation")
    report = client.get("/ui/api/report", params={"app": "fal-ai/fast-sdxl"}, headers=key).json()
    assert report["models"] and not any(m["loaded"] for m in report["models"])
    assert client.get("/ui/api/report", params={"app": "nope"}, headers=key).status_code == 404
    r = client.get("/ui/api/analytics", params={"window": 1}, headers=key)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "window"


def test_static_assets_reference_nothing_outside_the_server_and_ship_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = {p.resolve() for g in package_data["engine.server"] for p in (ROOT / "engine/server").glob(g)}
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    assert {p.resolve() for p in files} <= covered and (STATIC / "vendor/uPlot.LICENSE").is_file()
    for page in STATIC.glob("*.html"):
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.read_text())
        assert refs and all(r.startswith(("/", "#", "data:")) for r in refs), (page.name, refs)
    for script in [*STATIC.glob("*.js"), *STATIC.glob("*.css")]:
        urls = re.findall(r"https?://[^\s'\"`)]+", script.read_text())
        assert not urls, (script.name, urls)


# -- in a real browser -----------------------------------------------------------------------------------------------
def _browser_path() -> str | None:
    for name in (os.environ.get("ENGINE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("ENGINE_TEST_ARTIFACTS")
    folder = Path(root) / "pages" if root else tmp_path_factory.mktemp("pages-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\npage screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A keyed `engine serve` with tiny SDXL and AuraSR, and a LoRA file on a loopback file server (hence
    --allow-private-urls): (server URL, the LoRA's URL)."""
    pytest.importorskip("uvicorn")
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from serving import free_port, start_server, stop_server
    from test_lora import make_lora

    tmp = tmp_path_factory.mktemp("pages-server")
    (tmp / "loras").mkdir()
    make_lora(tmp / "loras" / "style.safetensors", seed=3, strength=4.0)
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp / "loras"))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--api-key", API_KEY,
            "--state-dir", str(tmp / "state"), "--log-level", "warning", "--allow-private-urls",
            "--endpoint", "fal-ai/fast-sdxl=tiny-sdxl", "--endpoint", "fal-ai/aura-sr=tiny-aura-sr"]
    proc = start_server(args, tmp / "server.log", f"{base}/health")
    try:
        yield base, f"http://127.0.0.1:{files.server_address[1]}/style.safetensors"
    finally:
        stop_server(proc)
        files.shutdown()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need playwright (the dev extra)")
    path = _browser_path()
    if path is None:
        pytest.skip("no chromium found (apt-get install chromium chromium-driver; .ci/run does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


class Watch:
    """What a page did: every request's URL and body, console errors (a CSP violation is one)."""

    def __init__(self, page) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append((r.method, r.url, r.post_data)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def check_same_origin(self, base: str) -> None:
        origin = urlsplit(base)[:2]
        outside = [u for _, u, _ in self.requests if not u.startswith(("data:", "blob:")) and urlsplit(u)[:2] != origin]
        assert not outside, outside
        assert not [u for _, u, _ in self.requests if API_KEY in u], "the key went into a URL"
        csp = [e for e in self.errors if "Content Security Policy" in e or "uncaught" in e]
        assert not csp, csp


def _wait_js(page, expression: str, timeout: float = 120.0) -> None:
    """Poll `expression` (a function source) until truthy: `wait_for_function` evaluates strings, which the pages'
    CSP (no 'unsafe-eval') forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def _result_pixels(page, base: str) -> np.ndarray:
    """The first output image of the result shown (read back by its request id through the queue protocol)."""
    import httpx
    from PIL import Image

    key = {"Authorization": f"Key {API_KEY}"}
    request_id = page.inner_text("#result-facts dd")
    result = httpx.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{request_id}", headers=key, timeout=60).json()
    return np.asarray(Image.open(io.BytesIO(httpx.get(result["images"][0]["url"], headers=key, timeout=60).content)))


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_playground_and_analytics_in_a_browser(served, browser, artifacts) -> None:
    import httpx

    base, lora_url = served
    shots = iter(range(1, 100))

    def shot(page, name: str) -> None:
        page.screenshot(path=str(artifacts / f"{next(shots):02d}-{name}.png"), full_page=True)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    watch = Watch(page)

    # 1. a keyed server: the page asks for the key, keeps it in sessionStorage, never in the URL
    page.goto(f"{base}/")
    page.wait_for_selector("#login:not([hidden])")
    shot(page, "login")
    page.fill("#login-key", API_KEY)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#fields .field")
    assert page.evaluate("sessionStorage.getItem('engine.apiKey')") == API_KEY
    assert API_KEY not in page.url

    # 2. every endpoint's form comes from its schema: one field per property, selects for enums, sliders for ranges
    options = page.eval_on_selector_all("#endpoint option", "os => os.map(o => o.value)")
    assert sorted(options) == sorted(ENDPOINTS)
    for app_id in options:
        page.select_option("#endpoint", app_id)
        schema = ENDPOINTS[app_id].schema.model_json_schema()
        for name in schema["properties"]:
            assert page.locator(f"#fields > .object > [data-field='{name}']").count() == 1, (app_id, name)
        for name, prop in schema["properties"].items():
            field = page.locator(f"[data-field='{name}']")
            if "enum" in prop:
                assert field.locator("select option").count() >= len(prop["enum"]), (app_id, name)
            if prop.get("type") in ("integer", "number") and "maximum" in prop and prop["maximum"] - prop["minimum"] <= 1000:
                slider = field.locator("input[type=range]")
                assert (float(slider.get_attribute("min")), float(slider.get_attribute("max"))) == (
                    prop["minimum"], prop["maximum"]), (app_id, name)
            if re.search(r"(^|_)(image|mask)_url$", name):  # image inputs: a file picker beside the URL
                assert field.locator("input[type=file]").count() == 1, (app_id, name)
        shot(page, f"form-{app_id.replace('/', '_')}")
    page.select_option("#endpoint", "fal-ai/fast-sdxl")
    assert page.locator("[data-field=loras] button", has_text="Add").count() == 1

    # 3. run fast-sdxl: live progress with previews, then the image with its size, seed and timings
    page.fill("[data-field=prompt] textarea", "a lighthouse at dusk")
    page.fill("[data-field=seed] input", "7")
    page.fill("[data-field=num_inference_steps] input[type=number]", "3")
    page.select_option("[data-field=image_size] select", "__custom")
    page.fill("[data-field='image_size.width'] input[type=number]", "64")
    page.fill("[data-field='image_size.height'] input[type=number]", "64")
    page.select_option("[data-field=format] select", "png")
    page.evaluate("""() => { window.__seen = []; new MutationObserver(() => window.__seen.push(
        document.getElementById('progress-text').textContent)).observe(document.getElementById('progress-text'),
        {childList: true, characterData: true, subtree: true}); }""")
    page.click("#run")
    page.wait_for_selector("img.output")
    _wait_js(page, "() => document.querySelector('img.output').naturalWidth > 0")
    shot(page, "sdxl-result")
    seen = page.evaluate("window.__seen")
    assert any(re.fullmatch(r"step \d of 3", s) for s in seen) and seen[-1] == "done", seen
    assert page.locator("#preview").is_visible()
    assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
    assert page.evaluate("document.querySelector('img.output').naturalWidth") == 64
    assert page.inner_text("#result-seed") == "7"
    facts = page.inner_text("#result-facts")
    assert "inference" in facts and "request" in facts
    assert "64×64 image/png" in page.inner_text("#result figcaption")
    output_pixels_before = _result_pixels(page, base)
    posts = [(u, body) for m, u, body in watch.requests if m == "POST"]
    streams = [json.loads(body) for u, body in posts if u.endswith("/fal-ai/fast-sdxl/stream")]
    assert len(streams) == 1, posts
    sent = streams[0]
    assert sent == {"prompt": "a lighthouse at dusk", "seed": 7, "num_inference_steps": 3,
                    "image_size": {"width": 64, "height": 64}, "format": "png"}
    assert any(u.startswith(f"{base}/queue/fal-ai/fast-sdxl/requests/") for m, u, _ in watch.requests if m == "GET")

    # 4. the snippets carry the same arguments
    assert '"seed": 7' in page.inner_text("#snippet") and 'fal_client.subscribe(\n    "fal-ai/fast-sdxl"' in page.inner_text("#snippet")
    page.click("#snippet-tabs [data-lang=js]")
    assert 'fal.subscribe("fal-ai/fast-sdxl"' in page.inner_text("#snippet")
    page.click("#snippet-tabs [data-lang=curl]")
    curl = page.inner_text("#snippet")
    assert f"'{base}/fal-ai/fast-sdxl'" in curl and API_KEY not in curl
    assert json.loads(re.search(r"-d '(.*)'", curl).group(1)) == sent
    shot(page, "snippet-curl")

    # the optimization report of the loaded model
    page.click("#report summary")
    page.wait_for_selector("#report-body table")
    assert "tiny-sdxl" in page.inner_text("#report-body h3")
    shot(page, "report")

    # 5. a 422: the server's message beside the field
    page.fill("[data-field=num_inference_steps] input[type=number]", "999")
    page.click("#run")
    error = page.locator("[data-field=num_inference_steps] > .field-error")
    error.wait_for(state="visible")
    assert "less than or equal to 50" in error.inner_text()
    assert page.get_attribute("[data-field=num_inference_steps] input[type=number]", "aria-invalid") == "true"
    shot(page, "422-beside-field")
    page.fill("[data-field=num_inference_steps] input[type=number]", "3")

    # ... and inside a LoRA list row: the schema's errors, then the server's check of the path
    page.click("[data-field=loras] button:has-text('Add')")
    page.fill("[data-field='loras.0.scale'] input[type=number]", "9")
    page.click("#run")
    path_error = page.locator("[data-field='loras.0.path'] > .field-error")
    path_error.wait_for(state="visible")
    assert "at least 1 character" in path_error.inner_text()
    assert "less than or equal to 4" in page.inner_text("[data-field='loras.0.scale'] > .field-error")
    page.fill("[data-field='loras.0.scale'] input[type=number]", "0.5")
    page.fill("[data-field='loras.0.path'] input", "../secret.safetensors")
    page.click("#run")
    _wait_js(page, "() => document.querySelector(\"[data-field='loras.0.path'] > .field-error\").textContent"
                   ".includes('hub id')")
    assert page.locator("[data-field='loras.0.scale'] > .field-error").is_hidden()
    shot(page, "422-lora-row")
    page.click("[data-field='loras.0'] button:has-text('Remove')")
    assert page.locator("[data-field='loras.0']").count() == 0

    # the same run with a LoRA (a file URL the server fetches): another image from the same seed
    key = {"Authorization": f"Key {API_KEY}"}
    http = httpx.Client(base_url=base, headers=key, timeout=60)
    plain = output_pixels_before
    page.click("[data-field=loras] button:has-text('Add')")
    page.fill("[data-field='loras.0.path'] input", lora_url)
    page.click("#run")
    page.wait_for_selector("img.output")
    _wait_js(page, "() => document.querySelector('img.output').naturalWidth > 0")
    with_lora = _result_pixels(page, base)
    assert with_lora.shape == plain.shape == (64, 64, 3) and np.abs(with_lora.astype(int) - plain).mean() > 1.0
    shot(page, "sdxl-with-lora")
    page.click("[data-field='loras.0'] button:has-text('Remove')")

    # 6. AuraSR: an input image picked from disk, uploaded through the server's storage route
    page.select_option("#endpoint", "fal-ai/aura-sr")
    image = artifacts / "input-16.png"
    image.write_bytes(_png(16, 16))
    page.set_input_files("[data-field=image_url] input[type=file]", str(image))
    _wait_js(page, "() => document.querySelector('[data-field=image_url] input[type=url]').value !== ''")
    url = page.input_value("[data-field=image_url] input[type=url]")
    assert url.startswith(f"{base}/files/"), url
    initiate = [body for m, u, body in watch.requests if m == "POST" and u == f"{base}/storage/upload/initiate"]
    assert [json.loads(b) for b in initiate] == [{"content_type": "image/png", "file_name": "input-16.png"}]
    (put,) = [u for m, u, _ in watch.requests if m == "PUT"]
    assert put.startswith(f"{base}/storage/upload/")
    stored = httpx.get(url, headers=key, timeout=30)
    assert stored.status_code == 200 and stored.content == image.read_bytes()
    page.click("#run")
    page.wait_for_selector("img.output")
    _wait_js(page, "() => document.querySelector('img.output').naturalWidth > 0")
    assert page.evaluate("document.querySelector('img.output').naturalWidth") == 64
    shot(page, "aura-sr-result")

    # a failed job for the analytics page: one cancelled while it waits behind another
    first = http.post("/queue/fal-ai/fast-sdxl", json={"prompt": "x", "num_inference_steps": 12,
                                                        "image_size": {"width": 64, "height": 64}}).json()
    second = http.post("/queue/fal-ai/fast-sdxl", json={"prompt": "y", "num_inference_steps": 2,
                                                         "image_size": {"width": 64, "height": 64}}).json()
    assert http.put(f"/queue/fal-ai/fast-sdxl/requests/{second['request_id']}/cancel").status_code == 202
    for rid in (first["request_id"], second["request_id"]):
        deadline = time.monotonic() + 120
        while http.get(f"/queue/fal-ai/fast-sdxl/requests/{rid}/status").json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    watch.check_same_origin(base)

    # 7. the analytics page shows those runs with their percentiles, errors and recent failures
    page.goto(f"{base}/analytics")
    page.wait_for_selector("section.app[data-app='fal-ai/fast-sdxl']")
    page.wait_for_selector("section.app canvas")
    api = http.get("/ui/api/analytics", params={"window": 3600}).json()["endpoints"]
    sdxl, aura = api["fal-ai/fast-sdxl"], api["fal-ai/aura-sr"]
    assert (sdxl["requests"], sdxl["succeeded"], sdxl["failed"]) == (4, 3, 1)  # the 422s never became jobs
    assert sdxl["errors_by_type"] == {"cancelled": 1} and sdxl["recent_failures"][0]["request_id"] == second["request_id"]
    assert (aura["requests"], aura["succeeded"]) == (1, 1)
    section = page.locator("section.app[data-app='fal-ai/fast-sdxl']")
    assert section.locator(".requests").inner_text() == "4"
    assert section.locator(".success-rate").inner_text() == "75.0%"
    for p in ("p50", "p75", "p90", "p99"):
        cell = section.locator(f"table.percentiles td[data-p={p}]").first.inner_text()
        assert cell != "–" and re.fullmatch(r"[\d.]+ (ms|s|min)", cell), (p, cell)
        assert 0 < sdxl["latency_s"][p] < 600
    assert sdxl["latency_s"]["p50"] <= sdxl["latency_s"]["p90"] <= sdxl["latency_s"]["p99"]
    assert "cancelled" in section.locator("ul.errors").inner_text()
    assert second["request_id"] in section.locator("table.failures").inner_text()
    assert page.locator("section.app[data-app='fal-ai/aura-sr'] .requests").inner_text() == "1"
    shot(page, "analytics")
    watch.check_same_origin(base)

    # 8. a phone-width screen: one column, nothing wider than the screen
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    mobile = phone.new_page()
    mobile.set_default_timeout(60_000)
    mobile.goto(f"{base}/")
    mobile.evaluate(f"sessionStorage.setItem('engine.apiKey', {json.dumps(API_KEY)})")
    for path, ready in (("/#fal-ai/fast-sdxl", "#fields .field"), ("/analytics", "section.app canvas")):
        mobile.goto(f"{base}{path}")
        mobile.reload()
        mobile.wait_for_selector(ready)
        assert mobile.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path
        shot(mobile, f"phone{path.split('#')[0].replace('/', '-') or '-playground'}")
    phone.close()
    context.close()
    http.close()
