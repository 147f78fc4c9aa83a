"""Hostile callers against the HTTP app, in process (httpx through Starlette's TestClient, no sockets): a bounded,
seeded fuzzer over every served route (wrong types per field, huge integers, NaN/Infinity, deep nesting, unknown
fields, broken JSON, non-JSON content types, hostile headers and ids) must get 4xx answers with fal's error JSON,
never a 5xx or an exception; invalid bodies never reach `prepare` (so no engine code); /openapi.json is a valid
OpenAPI 3 document listing every app id with its input and output schemas; /metrics parses as Prometheus text.

The few schema-valid bodies (unknown fields on a small valid body) run the tiny models at 64x64 and one step.
"""

import base64
import io
import json
import logging
import random
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from fastapi.testclient import TestClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from engine import Engine  # noqa: E402
from engine.endpoints import ENDPOINTS  # noqa: E402
from engine.server.app import create_app  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Key {KEY}"}
MODELS = {
    "fal-ai/fast-sdxl": "tiny-sdxl", "fal-ai/fast-lightning-sdxl": "tiny-sdxl",
    "fal-ai/stable-diffusion-v1-5": "tiny-sd15", "fal-ai/flux/dev": "tiny-flux", "fal-ai/flux/schnell": "tiny-flux",
    "fal-ai/aura-sr": "tiny-aura-sr",
    "fal-ai/fast-sdxl/image-to-image": "tiny-sdxl", "fal-ai/fast-sdxl/inpainting": "tiny-sdxl",
    "fal-ai/flux/dev/image-to-image": "tiny-flux", "fal-ai/flux-general": "tiny-flux",
    "fal-ai/creative-upscaler": "tiny-sd15",
}
SMALL_SIZE = {"width": 64, "height": 64}


def _data_uri(size: tuple[int, int] = (16, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def base_body(app_id: str) -> dict:
    """A small valid body for each app (what the fuzzer mutates)."""
    if app_id == "fal-ai/aura-sr":
        return {"image_url": _data_uri()}
    if app_id == "fal-ai/creative-upscaler":
        return {"image_url": _data_uri((32, 32)), "num_inference_steps": 1}
    body = {"prompt": "a lighthouse", "seed": 1, "image_size": dict(SMALL_SIZE),
            "num_inference_steps": "1" if app_id == "fal-ai/fast-lightning-sdxl" else 1}
    for name in ("image_url", "mask_url"):  # image-conditioned apps: strength 0.95 of 2 steps runs one
        if name in ENDPOINTS[app_id].schema.model_fields:
            body[name], body["num_inference_steps"] = _data_uri((64, 64)), 2
    if app_id == "fal-ai/lora":
        body["model_name"] = "tiny-sd15"
    return body


def routes(app_id: str) -> list[str]:
    return [f"/{app_id}", f"/{app_id}/stream", f"/queue/{app_id}"]


@pytest.fixture(scope="module")
def served():
    engine = Engine(device="cpu")
    app = create_app(engine, api_key=KEY, endpoint_overrides=MODELS)
    service = app.state.service
    prepared: list[str] = []
    real_prepare = service.prepare

    def spy(app_id, arguments):  # every call into the endpoint layer, i.e. past the server's validation
        prepared.append(app_id)
        return real_prepare(app_id, arguments)

    service.prepare = spy
    with TestClient(app, headers=AUTH) as client:  # raise_server_exceptions: an escaped exception fails the test
        yield client, prepared, service
    service.queue.shutdown(cancel_pending=True, timeout=10)


# -- the generator ------------------------------------------------------------------------------------------------
WRONG = [None, True, -1, 0, 1.5, 10**20, -(2**63), 2**64, 10**4000, "", "x" * 300, "1e9999", "NaN", [], [1, "a"],
         {}, {"a": 1}, "\x00\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
HOSTILE_EXTRAS = {"loras": "abc", "format": 5, "output_format": {"x": 1}, "width": "wide", "height": -5,
                  "model_name": 12, "guidance_scale": "strong", "negative_prompt": 5, "image_format": [],
                  "checkpoint": None, "num_inference_steps_x": 10**30, "__proto__": {"admin": True}}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_bodies(app_id: str, rng: random.Random) -> list[tuple[bytes, str | None]]:
    """(raw body, content type) pairs that the app's schema must refuse (checked against the schema below)."""
    schema = ENDPOINTS[app_id].schema
    base = base_body(app_id)
    out: list[tuple[bytes, str | None]] = []
    fields = list(schema.model_fields)
    for name in fields:  # wrong type per declared field, and a nested wrong type
        for value in rng.sample(WRONG, 4):
            out.append((json.dumps({**base, name: value}).encode(), "application/json"))
        out.append((json.dumps({**base, name: {"nested": [{"deep": [None] * 3}]}}).encode(), "application/json"))
    for name in ("seed", "num_images", "num_inference_steps", "upscale_factor"):  # huge and negative integers
        for value in (10**19, 2**63, -(10**30), 10**300):
            out.append((json.dumps({**base, name: value}).encode(), "application/json"))
    size = {"image_size": {"width": 10**12, "height": 64}}
    out.append((json.dumps({**base, **size}).encode(), "application/json"))
    out.append((json.dumps({**base, "image_size": {"width": 64, "height": 64, "depth": 3}}).encode(),
                "application/json"))
    text = json.dumps(base)  # JSON's non-finite constants, which Python's parser would accept
    for constant in ("NaN", "Infinity", "-Infinity"):
        out.append((text[:-1].encode() + f', "guidance_scale": {constant}}}'.encode(), "application/json"))
    out.append(((text[:-1] + ', "x": ' + _deep(3000) + "}").encode(), "application/json"))  # deep nesting
    out.append((_deep(100_000).encode(), "application/json"))
    out.append((('{"prompt": ' + '{"a": ' * 2000 + "1" + "}" * 2000 + "}").encode(), "application/json"))
    for cut in sorted(rng.sample(range(1, len(text)), 3)):  # broken JSON
        out.append((text[:cut].encode(), "application/json"))
    out += [(b"{", None), (b'{"prompt": "x",}', "application/json"), (text.encode() + b" trailing", None),
            (b"\xff\xfe\x00garbage", "application/json"), (bytes(rng.randrange(256) for _ in range(64)), None),
            (b"null", "application/json"), (b"42", "application/json"), (b'"a string"', "application/json"),
            (b"[1, 2, 3]", "application/json"), (b"true", "application/json"),
            (b'{"seed": ' + b"9" * 5000 + b"}", "application/json")]
    out += [(text.encode(), "text/plain"), (b"prompt=x&seed=1", "application/x-www-form-urlencoded"),  # not JSON
            (b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
            (text.encode(), "application/xml")]
    return out


def schema_refuses(app_id: str, raw: bytes, content_type: str | None) -> bool:
    """The oracle: what the app's pydantic schema (and strict JSON) says of a body."""
    if content_type and "json" not in content_type:
        return True
    try:
        value = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        return True
    if not isinstance(value, dict):
        return True
    try:
        ENDPOINTS[app_id].schema.model_validate(value)
    except (ValidationError, RecursionError):
        return True
    return False


def _assert_error_json(response, status: int | None = None) -> dict:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) >= {"detail", "error_type"}, body
    return body


# -- the fuzzer ---------------------------------------------------------------------------------------------------
def test_hostile_bodies_are_422_before_any_engine_code(served, caplog):
    client, prepared, _ = served
    rng = random.Random(20261202)
    sent = refused = 0
    statuses: dict[int, int] = {}
    with caplog.at_level(logging.ERROR, logger="engine.server.app"):
        for app_id in ENDPOINTS:
            for raw, content_type in hostile_bodies(app_id, rng):
                if not schema_refuses(app_id, raw, content_type):
                    continue  # a mutation the schema accepts (e.g. an int given as 1.0): not a hostile body
                for path in routes(app_id):
                    before = len(prepared)
                    headers = {"content-type": content_type} if content_type else {}
                    response = client.post(path, content=raw, headers=headers)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    sent += 1
                    body = _assert_error_json(response, 422)
                    assert body["error_type"] == "invalid_request"
                    assert isinstance(body["detail"], list) and body["detail"][0]["loc"][0] == "body", body
                    assert len(prepared) == before, f"{path}: an invalid body reached the endpoint layer"
                    refused += 1
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
    assert sent >= 300, sent
    print(f"\nfuzz: {sent} hostile bodies over {3 * len(ENDPOINTS)} routes -> {statuses}")


def test_hostile_headers_queries_ids_and_keys(served):
    client, prepared, service = served
    body = base_body("fal-ai/fast-sdxl")
    before = len(prepared)
    for value in ("nan", "inf", "-1", "0", "abc", "1e999", "\u00e9".encode("latin-1")):  # the start-timeout header
        response = client.post("/queue/fal-ai/fast-sdxl", json=body, headers={"x-fal-request-timeout": value})
        _assert_error_json(response, 422)
    for hook in ("http://[::1", "http://a:99999/", "ftp://example.com/", "http://" + "a" * 300 + ".com/",
                 "http://" + "a" * 5000, "javascript:alert(1)", "", "http://\u0000x/"):
        response = client.post("/queue/fal-ai/fast-sdxl", json=body, params={"fal_webhook": hook})
        _assert_error_json(response, 422)
    assert len(prepared) == before
    response = client.post("/queue/fal-ai/fast-sdxl", json=body, params={"fal_webhook": "http://127.0.0.1/"})
    _assert_error_json(response, 422)  # well-formed, refused by the SSRF check (after the body is prepared)
    before = len(prepared)
    ids = ["../../etc/passwd", "%00", "x" * 5000, "\u202e", "' OR 1=1 --", "00000000-0000-0000-0000-000000000000"]
    for request_id in ids:
        for method, suffix in (("GET", "/status"), ("GET", ""), ("PUT", "/cancel")):
            response = client.request(method, f"/queue/fal-ai/fast-sdxl/requests/{request_id}{suffix}",
                                      params={"logs": "\x00"})
            assert response.status_code in (404, 405), (request_id, response.status_code, response.text[:200])
            _assert_error_json(response)
    for path in ("/fal-ai/nope", "/queue/fal-ai/nope", "/fal-ai/flux", "/%2e%2e/%2e%2e/etc/passwd", "/queue/"):
        _assert_error_json(client.post(path, json=body), 404)
    for auth in (None, "Key wrong", f"Bearer {KEY}", KEY, f"Key {KEY} ", "Key \u00e9\u00e9".encode("latin-1")):
        headers = {"Authorization": auth} if auth is not None else {}
        anonymous = TestClient(client.app, headers=headers)
        for method, path in (("POST", "/fal-ai/fast-sdxl"), ("POST", "/queue/fal-ai/fast-sdxl"),
                             ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("GET", "/queue/fal-ai/fast-sdxl/requests/x/status")):
            response = anonymous.request(method, path, content=b"{broken")
            assert _assert_error_json(response, 401)["error_type"] == "unauthorized", (auth, path)
    assert len(prepared) == before


def test_unknown_fields_are_ignored_and_never_reach_the_engine(served):
    """The issue's 500s: `format` as a number and `loras` as a string on apps that do not declare them. fal ignores
    unknown arguments, and so does the server (the job log names them); the declared fields alone drive the run."""
    client, _, service = served
    handles = {}
    for app_id in ENDPOINTS:
        declared = ENDPOINTS[app_id].schema.model_fields
        extras = {k: v for k, v in HOSTILE_EXTRAS.items() if k not in declared and k != "image_format"}
        response = client.post(f"/queue/{app_id}", json={**base_body(app_id), **extras})
        assert response.status_code == 200, (app_id, response.text[:500])
        handles[app_id] = response.json()
    deadline = time.monotonic() + 300
    for app_id, submitted in handles.items():
        while True:
            status = client.get(submitted["status_url"], params={"logs": "1"}).json()
            if status["status"] == "COMPLETED" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status["status"] == "COMPLETED", (app_id, status)
        assert status["error_type"] is None, (app_id, status["error"])
        assert any(e["message"].startswith("ignored unknown arguments") for e in status["logs"]), status["logs"]
        result = client.get(submitted["response_url"])
        assert result.status_code == 200, result.text[:300]
        image = (result.json().get("images") or [result.json().get("image")])[0]
        declared = ENDPOINTS[app_id].schema.model_fields  # the app's default format; upscalers answer PNG
        fmt = next((declared[k].default for k in ("format", "output_format") if k in declared), "png")
        assert image["content_type"] == f"image/{fmt}"


# -- /openapi.json --------------------------------------------------------------------------------------------------
def test_openapi_is_valid_and_lists_every_app_with_its_schemas(served):
    client, _, _ = served
    doc = client.get("/openapi.json").json()
    try:
        from openapi_spec_validator import validate
    except ImportError:  # structural checks only
        validate = None
    if validate is not None:
        validate(doc)
    assert doc["openapi"].startswith("3.")
    components = doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["FalKey"] == {
        "type": "apiKey", "in": "header", "name": "Authorization",
        "description": doc["components"]["securitySchemes"]["FalKey"]["description"]}
    for app_id, spec in ENDPOINTS.items():
        name = spec.schema.__name__
        assert components[name]["properties"].keys() == spec.schema.model_json_schema()["properties"].keys()
        for path in routes(app_id):
            operation = doc["paths"][path]["post"]
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": f"#/components/schemas/{name}"}, (path, body)
            assert "422" in operation["responses"] and operation["security"] == [{"FalKey": []}]
        output = doc["paths"][f"/{app_id}"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        expected = "TextToImageOutput" if spec.task == "text-to-image" else "UpscaleOutput"  # upscalers: {image}
        assert output["$ref"].split("/")[-1] == expected
        submit = doc["paths"][f"/queue/{app_id}"]["post"]
        assert submit["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("SubmitResponse")
        assert any(p["name"] == "fal_webhook" for p in submit["parameters"])
    for suffix, method in (("/status", "get"), ("", "get"), ("/cancel", "put")):
        assert method in doc["paths"][f"/queue/{{app_path}}/requests/{{request_id}}{suffix}"]
    fast = components["FastSDXLInput"]["properties"]
    assert fast["num_images"]["maximum"] == 8 and "prompt" in components["FastSDXLInput"]["required"]
    for ref in _refs(doc):  # every reference resolves
        assert ref.split("/")[-1] in components, ref


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# -- /metrics -------------------------------------------------------------------------------------------------------
def test_metrics_parse_with_prometheus_client(served):
    client, _, _ = served
    client.post("/fal-ai/fast-sdxl", content=b"{", headers={"content-type": "application/json"})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(response.text)}
    assert families["engine_requests"].type == "counter"
    assert families["engine_failures"].type == "counter"
    assert families["engine_request_latency_seconds"].type == "histogram"
    assert families["engine_queue_depth"].type == "gauge" and families["engine_jobs_running"].type == "gauge"
    failures = {(s.labels["app"], s.labels["error_type"]): s.value for s in families["engine_failures"].samples
                if s.name == "engine_failures_total"}
    assert failures[("fal-ai/fast-sdxl", "invalid_request")] >= 1
    assert all(s.labels.get("app") in set(ENDPOINTS) | {"_unknown", None}
               for f in families.values() for s in f.samples)  # bounded label values, whatever the paths


# -- schemathesis over /openapi.json --------------------------------------------------------------------------------
def test_schemathesis_negative_cases_over_the_openapi_get_no_5xx(served, monkeypatch):
    """Schema-driven cases for every documented operation: invalid bodies, queries, headers and ids (negative
    mode), and for the GET/PUT routes also valid ones. Bodies the schema accepts stop at a dry-run `prepare` (the
    real runs are the tests above), which also checks that only schema-valid bodies get that far."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    from engine.errors import InvalidRequestError

    client, _, service = served
    reached = []

    def dry_run(app_id, arguments):
        ENDPOINTS[app_id].schema.model_validate(arguments)
        reached.append(app_id)
        raise InvalidRequestError("body", "dry run (the fuzzer runs no models)")

    monkeypatch.setattr(service, "prepare", dry_run)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app, headers=AUTH)
    modes = {"POST": [schemathesis.GenerationMode.NEGATIVE]}
    statuses: dict[int, int] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in modes.get(operation.method.upper(), list(schemathesis.GenerationMode)):
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(headers=AUTH)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (operation.label, case.body, response.text[:300])

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (/health takes no input)
                pass
    assert operations >= 3 * len(ENDPOINTS) + 3
    assert sum(statuses.values()) >= 300, statuses
    print(f"\nschemathesis: {sum(statuses.values())} cases over {operations} operations -> {statuses}; "
          f"{len(reached)} schema-valid bodies reached the dry-run prepare")


def test_in_process_prepare_never_reads_unknown_arguments(served):
    """The same rule for the fal-style API in process: unknown arguments are noted and never read."""
    _, _, service = served
    for app_id in ENDPOINTS:
        declared = ENDPOINTS[app_id].schema.model_fields
        extras = {k: v for k, v in HOSTILE_EXTRAS.items() if k not in declared and k != "image_format"}
        call = type(service).prepare(service, app_id, {**base_body(app_id), **extras})  # the real one, not the spy
        assert call.notes[0] == f"ignored unknown arguments: {', '.join(sorted(extras))}", (app_id, call.notes)
