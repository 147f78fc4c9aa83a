"""OpenAI images API: parameter mapping, errors in OpenAI's shape and auth, on a bare app with a recording runner.
The official `openai` package against `engine serve` on tiny models is in test_server_extras.py."""

import base64
import io

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.server.openai_api import OpenAIConfig, OpenAIError, add_openai_routes, build_arguments  # noqa: E402

FIELDS = frozenset({"prompt", "image_size", "num_images", "format", "sync_mode", "seed", "num_inference_steps",
                    "negative_prompt", "guidance_scale", "image_url", "mask_url", "strength"})


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client():
    runs = []

    def resolve(model, task):
        if model == "missing":
            raise OpenAIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
        return {"generate": "fal-ai/fast-sdxl", "edit": "fal-ai/i2i", "inpaint": "fal-ai/inpaint"}[task], {}

    async def run(request, app_id, arguments):
        runs.append((app_id, arguments))
        n = arguments["num_images"]
        url = "data:image/png;base64,QUJD" if arguments["sync_mode"] else "https://h/files/abc.png"
        return {"images": [{"url": url}] * n}

    from fastapi import FastAPI

    app = FastAPI()
    add_openai_routes(app, OpenAIConfig(resolve=resolve, schema_fields=lambda app_id: FIELDS, run=run,
                                        key_ok=lambda h: h == "Key k", requires_auth=True,
                                        models=lambda: [{"id": "fal-ai/fast-sdxl", "object": "model"}]))
    c = TestClient(app)
    c.runs = runs
    return c


AUTH = {"Authorization": "Bearer k"}


def test_generations_map_parameters_and_answer_urls_or_b64(client):
    r = client.post("/v1/images/generations", headers=AUTH, json={
        "model": "fal-ai/fast-sdxl", "prompt": "a cat", "n": 2, "size": "64x96", "quality": "hd", "style": "vivid",
        "seed": 5, "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert [d["url"] for d in r.json()["data"]] == ["https://h/files/abc.png"] * 2
    app_id, args = client.runs[-1]
    assert app_id == "fal-ai/fast-sdxl" and args["image_size"] == {"width": 64, "height": 96}
    assert args["num_images"] == 2 and args["seed"] == 5 and args["num_inference_steps"] == 2
    assert args["format"] == "png" and args["sync_mode"] is False and "quality" not in args
    r = client.post("/v1/images/generations", headers={"Authorization": "Key k"},
                    json={"prompt": "x", "response_format": "b64_json", "size": "auto"})
    assert r.json()["data"] == [{"b64_json": "QUJD", "revised_prompt": None}]
    assert "image_size" not in client.runs[-1][1]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 1.5}, 400, "n"),
    ({"prompt": "x", "quality": "ultra"}, 400, "quality"),
    ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": "x", "model": "missing"}, 404, "model"),
])
def test_errors_in_openai_shape(client, body, status, param):
    r = client.post("/v1/images/generations", headers=AUTH, json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_auth_and_models(client):
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers=AUTH).json() == {"object": "list", "data": [
        {"id": "fal-ai/fast-sdxl", "object": "model"}]}
    assert client.post("/v1/images/generations", headers=AUTH, content=b"{nope",
                       ).json()["error"]["code"] == "invalid_json"


def test_edits_take_multipart_image_and_mask(client):
    r = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "make it red", "n": "1", "strength": "0.6",
                                                            "seed": "3"},
                    files={"image": ("a.png", png(), "image/png")})
    assert r.status_code == 200, r.text
    app_id, args = client.runs[-1]
    assert app_id == "fal-ai/i2i" and args["strength"] == 0.6 and args["seed"] == 3
    assert base64.b64decode(args["image_url"].split(",", 1)[1]) == png() and "mask_url" not in args
    client.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"},
                files=[("image[]", ("a.png", png(), "image/png")), ("mask", ("m.png", png(), "image/png"))])
    app_id, args = client.runs[-1]
    assert app_id == "fal-ai/inpaint" and args["mask_url"].startswith("data:image/png;base64,")
    r = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"},
                    files={"image": ("a.txt", b"not an image at all", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"})  # form-urlencoded: no file at all
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    r = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"}, files={"other": ("a", b"1")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_build_arguments_uses_the_apps_format_field():
    args, fmt = build_arguments({"prompt": "x", "output_format": "jpeg"}, frozenset({"output_format"}), {})
    assert args["output_format"] == "jpeg" and "format" not in args and fmt == "url"
