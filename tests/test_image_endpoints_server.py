"""The image-conditioned fal apps through the official fal client against a real `engine serve` over TLS, on tiny
models: an input image uploaded with the client (`upload_image`) and one passed as a data URI (`encode_image`);
bad inputs come back as 422s that name the fal field.

The client is pointed at the server as in test_server_extras.py: the run/queue/REST/CDN constants of
`fal_client.client` are set for this module only (the values FAL_RUN_HOST / FAL_QUEUE_RUN_HOST would give)."""

import base64
import io
import ssl

import numpy as np
import pytest
from PIL import Image

fal_client = pytest.importorskip("fal_client")
trustme = pytest.importorskip("trustme")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serving import free_port, start_server, stop_server  # noqa: E402

API_KEY = "image-key"
PORT = free_port()
BASE = f"https://127.0.0.1:{PORT}"
ENDPOINTS = {
    "fal-ai/fast-sdxl/image-to-image": "tiny-sdxl", "fal-ai/fast-sdxl/inpainting": "tiny-sdxl-inpainting",
    "fal-ai/flux/dev/image-to-image": "tiny-flux", "fal-ai/flux-general": "tiny-flux",
    "fal-ai/creative-upscaler": "tiny-sd15",
}


def noise(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def square_mask(size=(64, 64)) -> Image.Image:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    return Image.fromarray(m)


def decode(url: str, http: "httpx.Client") -> Image.Image:
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    response = http.get(url)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-apps")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    args = ["--host", "127.0.0.1", "--port", str(PORT), "--ssl-certfile", str(cert_file), "--ssl-keyfile",
            str(key_file), "--api-key", API_KEY, "--device", "cpu", "--log-level", "warning"]
    for app, model in ENDPOINTS.items():
        args += ["--endpoint", f"{app}={model}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(ca_file))
        proc = start_server(args, tmp / "server.log", f"{BASE}/health")
        for name, value in (("RUN_URL_FORMAT", f"{BASE}/"), ("QUEUE_URL_FORMAT", f"{BASE}/queue/"),
                            ("REST_URL", BASE), ("CDN_URL", BASE)):
            mp.setattr(fal_client.client, name, value)
        http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=60,
                            headers={"Authorization": f"Key {API_KEY}"})
        try:
            yield type("S", (), {"proc": proc, "http": http, "log": tmp / "server.log",
                                 "client": fal_client.SyncClient(key=API_KEY)})
        finally:
            http.close()
            stop_server(proc)


def _run_i2i(server, image_url: str) -> Image.Image:
    out = server.client.run("fal-ai/fast-sdxl/image-to-image", {
        "prompt": "a harbour", "seed": 3, "num_inference_steps": 2, "strength": 0.5, "sync_mode": True,
        "image_url": image_url})
    assert out["seed"] == 3 and out["has_nsfw_concepts"] == [None]
    return decode(out["images"][0]["url"], server.http)


def test_image_to_image_with_a_data_uri(server):
    image = _run_i2i(server, fal_client.encode_image(noise((96, 64)), format="png"))
    assert image.size == (96, 64)  # the output follows the input image


def test_image_to_image_with_an_uploaded_image(server):
    probe = server.http.post(f"{BASE}/storage/auth/token?storage_type=fal-cdn-v3", json={})
    if probe.status_code == 404:
        pytest.skip("this server build has no upload routes (fal's storage API)")
    uploaded = server.client.upload_image(noise((96, 64)), format="png")
    assert uploaded.startswith(f"{BASE}/files/")
    by_upload = _run_i2i(server, uploaded)
    by_data_uri = _run_i2i(server, fal_client.encode_image(noise((96, 64)), format="png"))
    assert by_upload.size == (96, 64)
    assert np.array_equal(np.asarray(by_upload), np.asarray(by_data_uri))  # same pixels and seed: same image


def test_inpainting_flux_image_to_image_and_flux_general(server):
    image = fal_client.encode_image(noise((64, 64), 1), format="png")
    out = server.client.run("fal-ai/fast-sdxl/inpainting", {
        "prompt": "a door", "image_url": image, "mask_url": fal_client.encode_image(square_mask(), format="png"),
        "seed": 1, "num_inference_steps": 2, "sync_mode": True})
    assert decode(out["images"][0]["url"], server.http).size == (64, 64)
    out = server.client.run("fal-ai/flux/dev/image-to-image", {
        "prompt": "a door", "image_url": image, "seed": 1, "num_inference_steps": 2, "sync_mode": True})
    assert decode(out["images"][0]["url"], server.http).size == (64, 64)
    out = server.client.run("fal-ai/flux-general", {
        "prompt": "a door", "seed": 1, "num_inference_steps": 2, "image_size": {"width": 64, "height": 64},
        "controlnets": [{"path": "tiny-controlnet-flux", "control_image_url": image, "conditioning_scale": 0.8,
                         "end_percentage": 0.5}], "sync_mode": True})
    assert decode(out["images"][0]["url"], server.http).size == (64, 64)


def test_creative_upscaler(server):
    out = server.client.run("fal-ai/creative-upscaler", {
        "image_url": fal_client.encode_image(noise((48, 40), 2), format="png"), "seed": 4, "scale": 2,
        "num_inference_steps": 2, "sync_mode": True})
    assert out["seed"] == 4 and decode(out["image"]["url"], server.http).size == (96, 80)


@pytest.mark.parametrize("app, args, field", [
    ("fal-ai/fast-sdxl/inpainting", {"mask_url": "small-mask"}, "mask_url"),
    ("fal-ai/fast-sdxl/image-to-image", {"strength": 1.5}, "strength"),
    ("fal-ai/flux/dev/image-to-image", {"strength": -0.2}, "strength"),
    ("fal-ai/flux-general", {"controlnets": [{"path": "tiny-controlnet-sdxl"}]}, "controlnets.0.path"),
    ("fal-ai/fast-sdxl/image-to-image", {"image_url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="},
     "image_url"),
])
def test_bad_inputs_are_422_naming_the_field(server, app, args, field):
    image = fal_client.encode_image(noise((64, 64)), format="png")
    body = {"prompt": "x", "image_url": image, "num_inference_steps": 2}
    if app == "fal-ai/fast-sdxl/inpainting":
        body["mask_url"] = fal_client.encode_image(square_mask((32, 64)), format="png")  # another size
    if app == "fal-ai/flux-general":
        body.pop("image_url")
        args = {"controlnets": [{**args["controlnets"][0], "control_image_url": image}]}
    body.update({k: v for k, v in args.items() if k != "mask_url"})
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        server.client.run(app, body)
    assert err.value.status_code == 422
    locs = [".".join(str(p) for p in item["loc"][1:]) for item in err.value.response.json()["detail"]]
    assert field in locs, err.value.response.text
    assert server.proc.poll() is None
