"""Untrusted callers (the HTTP server; the fal-style service unless trusted=True) name registry ids or hub ids only,
never anything on the server's disk, and every URL a caller names goes through the one SSRF guard (engine/net.py).

Bounded: loopback servers only, the tiny SD 1.5 model, HF_HUB_OFFLINE (conftest)."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

from engine import errors, net
from engine.errors import InvalidRequestError, RefusedSourceError
from engine.loading import CallerPolicy, as_caller, check_untrusted_model, load_model
from engine.lora import LoraSpec, resolve_lora
from engine.service import FalService

SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1, "seed": 3}
UNTRUSTED = CallerPolicy(trusted=False)


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from engine.loading.tiny import ensure_tiny_model

    return ensure_tiny_model("sd15")


@pytest.fixture
def disk(tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path holding a real tiny model at ./owner/name (hub-like), ./local, a symlink ./owner/link, and a
    LoRA file at ./owner/repo/lora.safetensors."""
    shutil.copytree(tiny_folder, tmp_path / "owner" / "name")
    shutil.copytree(tiny_folder, tmp_path / "local")
    os.symlink(tmp_path / "local", tmp_path / "owner" / "link")
    (tmp_path / "owner" / "repo").mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "owner" / "repo" / "lora.safetensors"))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _names(disk: Path) -> list[str]:
    return ["local", "./local", str(disk / "local"), "../local", "sub/../local", "owner/name", "owner/link",
            "owner/name/", "~/local", "owner/../local"]


def _refusal(fn, *args, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(*args, **kwargs)
    assert info.value.http_status == 422
    return info.value


def _text(error: InvalidRequestError, name: str) -> str:
    return str(error).replace(repr(name), "NAME").replace(name, "NAME")


# -- model names ----------------------------------------------------------------------------------------------------
def test_untrusted_service_refuses_every_local_spelling(engine, disk):
    service = FalService(engine)  # untrusted by default
    for name in _names(disk):
        error = _refusal(service.prepare, "fal-ai/lora", {"model_name": name, "prompt": "x", **SMALL})
        assert error.field == "model_name", name


def test_refusal_does_not_reveal_whether_a_path_exists(engine, disk):
    service = FalService(engine)
    pairs = [("owner/name", "owner/nope"), ("owner/link", "owner/gone"), ("local", "nope"),
             (str(disk / "local"), str(disk / "nope")), ("../local", "../nope")]
    for existing, missing in pairs:
        a = _refusal(service.prepare, "fal-ai/lora", {"model_name": existing, "prompt": "x", **SMALL})
        b = _refusal(service.prepare, "fal-ai/lora", {"model_name": missing, "prompt": "x", **SMALL})
        assert _text(a, existing) == _text(b, missing), (existing, missing)
        assert type(a) is type(b)


def test_loader_never_reads_a_local_path_for_an_untrusted_caller(disk):
    """Defense in depth: even past the service, load_model under an untrusted policy does not touch ./owner/name."""
    for name in ("owner/name", "owner/link", "./local", str(disk / "local")):
        with as_caller(UNTRUSTED):
            error = _refusal(load_model, name)
        assert isinstance(error, RefusedSourceError), name


def test_hub_download_is_off_by_default_for_untrusted_callers():
    error = _refusal(check_untrusted_model, "someone/not-cached", UNTRUSTED)
    assert "not in this server's model cache" in str(error) and "--allow-hub-downloads" in str(error)
    allowed = CallerPolicy(trusted=False, allow_hub_downloads=True)
    assert check_untrusted_model("someone/not-cached", allowed) == "hub"
    assert check_untrusted_model("tiny-sd15", UNTRUSTED) == "registry"
    _refusal(check_untrusted_model, "../x", allowed)  # downloads on: still never a path


def test_trusted_engine_api_loads_local_folders(engine, disk):
    out = engine.generate(model="owner/name", prompt="x", width=64, height=64, num_inference_steps=1, seed=1)
    assert len(out.images) == 1
    trusted = FalService(engine, trusted=True)
    fal_out = trusted.run("fal-ai/lora", {"model_name": str(disk / "local"), "prompt": "x", **SMALL})
    assert len(fal_out["images"]) == 1
    assert trusted.prepare("fal-ai/lora", {"model_name": "./local", "prompt": "x", **SMALL}).model == "./local"


def test_allow_list(engine, disk):
    service = FalService(engine, allow_models={"tiny-sd15"})
    assert service.prepare("fal-ai/lora", {"model_name": "tiny-sd15", "prompt": "x", **SMALL}).model == "tiny-sd15"
    error = _refusal(service.prepare, "fal-ai/lora", {"model_name": "tiny-sdxl", "prompt": "x", **SMALL})
    assert error.field == "model_name" and "allows" in str(error)
    _refusal(service.prepare, "fal-ai/lora", {"model_name": "owner/name", "prompt": "x", **SMALL})
    # models the operator mapped to an endpoint are served whatever the allow-list says
    pinned = FalService(engine, endpoint_overrides={"fal-ai/fast-sdxl": "tiny-sdxl"}, allow_models={"tiny-sd15"})
    assert pinned.prepare("fal-ai/fast-sdxl", {"prompt": "x", **SMALL}).model == "tiny-sdxl"
    out = service.run("fal-ai/lora", {"model_name": "tiny-sd15", "prompt": "x", **SMALL})
    assert len(out["images"]) == 1


def test_http_app_refuses_local_paths_with_422(engine, disk):
    from starlette.testclient import TestClient

    from engine.server.app import create_app

    app = create_app(engine)
    with TestClient(app) as client:
        texts = {}
        for name in _names(disk) + ["owner/nope", "nope", str(disk / "nope")]:
            response = client.post("/fal-ai/lora", json={"model_name": name, "prompt": "x", **SMALL})
            assert response.status_code == 422, (name, response.text)
            texts[name] = response.text.replace(name, "NAME")
        assert texts["owner/name"] == texts["owner/nope"] and texts[str(disk / "local")] == texts[str(disk / "nope")]
        app.state.service.allow_models = frozenset({"tiny-sdxl"})
        assert client.post("/fal-ai/lora", json={"model_name": "tiny-sd15", "prompt": "x", **SMALL}).status_code == 422
        ok = client.post("/fal-ai/lora", json={"model_name": "tiny-sdxl", "prompt": "x", **SMALL})
        assert ok.status_code == 200, ok.text


# -- LoRA paths -----------------------------------------------------------------------------------------------------
def test_untrusted_lora_paths_are_urls_or_cached_hub_files_only(disk):
    local = disk / "owner" / "repo" / "lora.safetensors"
    texts = {}
    for path in (str(local), "owner/repo/lora.safetensors", "./owner/repo/lora.safetensors",
                 "owner/repo/missing.safetensors", str(disk / "missing.safetensors"), "../x.safetensors",
                 "file:///etc/passwd", "owner/repo/../repo/lora.safetensors"):
        with as_caller(UNTRUSTED):
            error = _refusal(resolve_lora, LoraSpec(path=path), 0)
        assert isinstance(error, RefusedSourceError) and error.field == "loras.0.path", path
        texts[path] = _text(error, path)
    assert texts[str(local)] == texts[str(disk / "missing.safetensors")]
    assert texts["owner/repo/lora.safetensors"] == texts["owner/repo/missing.safetensors"].replace(
        "missing.safetensors", "lora.safetensors")
    assert "cache" in texts["owner/repo/lora.safetensors"]
    # the trusted API reads the same local file
    assert resolve_lora(LoraSpec(path=str(local)), 0).file == local.resolve()


# -- the SSRF guard -------------------------------------------------------------------------------------------------
PUBLIC = "93.184.216.34"  # a global address; the connector below maps it to the loopback server


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    posts: list[bytes] = []

    def do_GET(self) -> None:  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "no-length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


BODY = os.urandom(300_000)


@pytest.fixture(scope="module")
def loopback() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    _Handler.routes = {
        "/data": (200, {}, BODY),
        "/unsized": (200, {"no-length": "1"}, BODY),
        "/same-host": (302, {"Location": "/data"}, b""),
        "/to-loopback": (302, {"Location": f"http://127.0.0.1:{port}/data"}, b""),
        "/to-internal": (302, {"Location": f"http://internal.example:{port}/data"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    yield port
    httpd.shutdown()
    httpd.server_close()


class _Fake:
    """A resolver that records each lookup (public.example -> a global address, internal.example -> 10.x, IP
    literals -> themselves) and a connector that sends the global address to the loopback server."""

    def __init__(self, port: int, answers: dict[str, list[str]] | None = None):
        self.port = port
        self.lookups: list[str] = []
        self.connects: list[str] = []
        self.answers = answers or {"public.example": [PUBLIC], "internal.example": ["10.1.2.3"]}

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answer = self.answers.get(host, [host])
        if isinstance(answer, list) and answer and isinstance(answer[0], list):  # a rebinding server: one per call
            return answer.pop(0)
        return answer

    def connect(self, address: str, port: int, timeout: float):
        import socket

        self.connects.append(address)
        assert address == PUBLIC, f"connected to an unchecked address {address}"
        return socket.create_connection(("127.0.0.1", self.port), timeout)

    def guard(self, **kw) -> net.Guard:
        return net.Guard(resolver=self.resolve, connector=self.connect, **kw)


def test_loopback_and_private_addresses_are_refused(loopback):
    for url in (f"http://127.0.0.1:{loopback}/data", "http://[::1]/x", "http://10.0.0.7/x", "http://169.254.169.254/",
                "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x", "http://localhost/x", "ftp://example.com/x"):
        error = _refusal(net.fetch, url, field="image_url", max_bytes=1000)
        assert error.field == "image_url", url
    fake = _Fake(loopback)
    _refusal(net.fetch, "http://internal.example/x", field="f", max_bytes=10, guard=fake.guard())
    assert fake.connects == []  # refused before any connection


def test_redirects_are_rechecked_each_hop(loopback):
    for path, host in (("/to-loopback", "127.0.0.1"), ("/to-internal", "internal.example")):
        fake = _Fake(loopback)
        error = _refusal(net.fetch, f"http://public.example:{loopback}{path}", field="image_url", max_bytes=10**6,
                         guard=fake.guard())
        assert "private, loopback" in str(error)
        assert fake.lookups == ["public.example", host] and fake.connects == [PUBLIC]
    fake = _Fake(loopback)
    assert "scheme 'file'" in str(_refusal(net.fetch, f"http://public.example:{loopback}/to-file", field="f",
                                           max_bytes=10, guard=fake.guard()))
    assert "redirects" in str(_refusal(net.fetch, f"http://public.example:{loopback}/loop", field="f",
                                       max_bytes=10, guard=fake.guard()))
    assert len(fake.lookups) == 1 + 1 + net.MAX_REDIRECTS


def test_resolution_is_pinned_once_per_hop(loopback):
    fake = _Fake(loopback)
    assert net.fetch(f"http://public.example:{loopback}/same-host", field="f", max_bytes=10**6,
                     guard=fake.guard()) == BODY
    assert fake.lookups == ["public.example", "public.example"] and fake.connects == [PUBLIC, PUBLIC]
    # a rebinding DNS server (public first, loopback after) gets no second question within a hop
    rebinding = _Fake(loopback, {"rebind.example": [[PUBLIC], ["127.0.0.1"]]})
    assert net.fetch(f"http://rebind.example:{loopback}/data", field="f", max_bytes=10**6,
                     guard=rebinding.guard()) == BODY
    assert rebinding.lookups == ["rebind.example"] and rebinding.connects == [PUBLIC]


def test_size_caps_and_streamed_download(loopback, tmp_path):
    fake = _Fake(loopback)
    for path in ("/data", "/unsized"):  # declared length, then counted while streaming
        error = _refusal(net.download, f"http://public.example:{loopback}{path}", tmp_path, field="f",
                         max_bytes=100_000, guard=fake.guard())
        assert "over the limit" in str(error)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    got = net.download(f"http://public.example:{loopback}/unsized", tmp_path, field="f", max_bytes=10**6,
                       guard=fake.guard())
    assert got.sha256 == hashlib.sha256(BODY).hexdigest() and got.size == len(BODY)
    assert got.path.read_bytes() == BODY and got.path.parent == tmp_path


def test_url_lora_is_streamed_to_the_cache_by_hash(loopback, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file({"lora": torch.ones(3)}, str(weights))
    _Handler.routes["/lora.safetensors"] = (200, {}, weights.read_bytes())
    url = f"http://127.0.0.1:{loopback}/lora.safetensors"
    with as_caller(UNTRUSTED):  # loopback is private: refused for a remote caller
        _refusal(resolve_lora, LoraSpec(path=url), 0)
    resolved = resolve_lora(LoraSpec(path=url), 0, allow_private_urls=True)
    assert resolved.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert resolved.file.name == f"{resolved.sha256}.safetensors" and resolved.file.read_bytes() == weights.read_bytes()
    assert not list(resolved.file.parent.glob("*.part"))


def test_webhooks_go_through_the_guard(engine, loopback):
    url = f"http://127.0.0.1:{loopback}/hook"
    error = _refusal(FalService(engine, endpoint_overrides={"fal-ai/fast-sdxl": "tiny-sdxl"}).submit,
                     "fal-ai/fast-sdxl", {"prompt": "x", **SMALL}, url)
    assert error.field == "fal_webhook"
    _refusal(net.post_json, url, b"{}", field="fal_webhook")
    fake = _Fake(loopback)
    _Handler.posts.clear()
    assert net.post_json(f"http://public.example:{loopback}/hook", b'{"a": 1}', field="fal_webhook",
                         guard=fake.guard()) == 204
    assert _Handler.posts == [b'{"a": 1}'] and fake.lookups == ["public.example"] and fake.connects == [PUBLIC]


def test_errors_module_keeps_refusals_422():
    assert issubclass(errors.RefusedSourceError, errors.InvalidRequestError)
    assert errors.RefusedSourceError("model_name", "x").http_status == 422


def test_untrusted_hub_downloads_are_capped(monkeypatch):
    import engine.loading as loading

    fetched = []
    monkeypatch.setattr(loading, "cached_snapshot", lambda repo: None)
    monkeypatch.setattr(loading, "fetch_hub_model", lambda repo: fetched.append(repo))
    monkeypatch.setattr(loading, "hub_snapshot_bytes", lambda repo: 10**12)
    policy = CallerPolicy(trusted=False, allow_hub_downloads=True, max_hub_bytes=10**9)
    with as_caller(policy):
        error = _refusal(load_model, "someone/huge")
    assert "over this server's download limit" in str(error) and fetched == []


def test_allow_listed_hub_ids_are_still_never_local_folders(disk, monkeypatch):
    import engine.loading as loading

    monkeypatch.setattr(loading, "hub_snapshot_bytes", lambda repo: 10**12)  # no network: refused by size
    policy = CallerPolicy(trusted=False, allow_models=frozenset({"owner/name"}), max_hub_bytes=10)
    with as_caller(policy):
        error = _refusal(load_model, "owner/name")  # ./owner/name exists and holds a model: not read
    assert "download limit" in str(error)
    with as_caller(policy.with_pinned("owner/name")):  # the operator's own endpoint mapping: as configured
        assert load_model("owner/name").source == str((disk / "owner" / "name").resolve())


def test_a_local_model_loaded_by_name_is_not_served_to_an_untrusted_caller(disk):
    """Models are cached by name: ./owner/name loaded by a trusted caller must not answer an untrusted caller's hub
    id owner/name (even with hub downloads on, when the service lets the name through)."""
    from engine import Engine

    eng = Engine(device="cpu")
    assert eng.generate(model="owner/name", prompt="x", width=64, height=64, num_inference_steps=1, seed=1).images
    with as_caller(CallerPolicy(trusted=False, allow_hub_downloads=True)):
        error = _refusal(eng.generate, model="owner/name", prompt="x", width=64, height=64, num_inference_steps=1)
    assert isinstance(error, RefusedSourceError) and "model cache" in str(error)
    assert eng.generate(model="owner/name", prompt="x", width=64, height=64, num_inference_steps=1, seed=1).images


def test_one_grammar_for_hub_names():
    """engine/sources.py is the one definition of a hub id / hub file; loaders, LoRAs and endpoints all use it."""
    from engine import endpoints, loading, lora, sources

    assert loading.is_hub_id is sources.is_hub_id and lora.parse_hub_ref is sources.parse_hub_ref
    assert endpoints.is_hub_id is sources.is_hub_id and endpoints.parse_hub_ref is sources.parse_hub_ref
    assert sources.is_hub_id("stabilityai/sdxl-turbo")
    for bad in ("../x", "a/b/c", "owner/.hidden", "-owner/x", "owner/x.", "a--b/c", "/abs/path", "owner"):
        assert not sources.is_hub_id(bad), bad
    assert sources.parse_hub_ref("owner/repo") == ("owner/repo", None)
    assert sources.parse_hub_ref("owner/repo/sub/w.safetensors", file_suffix=".safetensors") == \
        ("owner/repo", "sub/w.safetensors")
    assert sources.parse_hub_ref("owner/repo/w.bin", file_suffix=".safetensors") is None
    assert sources.parse_hub_ref("owner/repo/../../x.safetensors") is None
    assert sources.parse_hub_ref("./owner/repo") is None
