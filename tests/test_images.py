"""load_image_input: every accepted kind of input, and a clear InvalidRequestError for each bad one."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.images import check_address, load_image_input


def _png(size: tuple[int, int] = (7, 5), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _error(value: object, **kwargs: object) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        load_image_input(value, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------ good inputs


def test_pil_image_is_returned() -> None:
    image = Image.new("RGBA", (3, 4))
    assert load_image_input(image) is image


@pytest.mark.parametrize(
    "array,mode",
    [
        (np.zeros((5, 7), np.uint8), "L"),
        (np.zeros((5, 7, 1), np.uint8), "L"),
        (np.zeros((5, 7, 3), np.uint8), "RGB"),
        (np.zeros((5, 7, 4), np.uint8), "RGBA"),
        (np.full((5, 7, 3), 0.5, np.float32), "RGB"),
        (np.zeros((5, 7), np.uint16), "L"),
        (np.zeros((5, 7), bool), "L"),
    ],
)
def test_numpy_arrays(array: np.ndarray, mode: str) -> None:
    image = load_image_input(array)
    assert image.size == (7, 5) and image.mode == mode


def test_float_array_scales_to_uint8() -> None:
    image = load_image_input(np.array([[0.0, 0.5, 1.0, 2.0]], np.float64))
    assert list(np.asarray(image)[0]) == [0, 128, 255, 255]


def test_local_path_bytes_and_data_uri(tmp_path: Path) -> None:
    path = tmp_path / "image.bin"  # the name says nothing: the content decides
    path.write_bytes(_png())
    for value in (str(path), path, _png(), _data_uri(_png()), _data_uri(_png(), "text/plain")):
        image = load_image_input(value)
        assert image.size == (7, 5) and image.getpixel((0, 0)) == (10, 200, 30)


def test_jpeg_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (8, 4))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image_input(buffer.getvalue()).size == (4, 8)


# ------------------------------------------------------------------------------------------------- bad inputs


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, not a png")
    error = _error(str(path))
    assert error.field == "image_url" and "not an image" in str(error)
    assert "not an image" in str(_error(b"GIF88a nope"))


def test_truncated_png() -> None:
    """The header parses, so only the forced full decode notices the missing data."""
    noisy = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(noisy, format="PNG")
    error = _error(noisy.getvalue()[:-200])
    assert "truncated or corrupt PNG" in str(error) and error.field == "image"


def test_corrupted_data_uri() -> None:
    assert "corrupted base64" in str(_error("data:image/png;base64,iVBORw0KGgo!!!"))
    assert "no comma" in str(_error("data:image/png;base64"))
    error = _error("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode())
    assert error.field == "image_url"


def test_over_the_pixel_limit_is_refused_before_decoding() -> None:
    error = _error(_png((100, 100)), max_pixels=9_999)
    assert "over the limit" in str(error) and error.allowed == "at most 9999 pixels"
    assert "over the limit" in str(_error(np.zeros((100, 100), np.uint8), max_pixels=100))
    assert "over the limit" in str(_error(Image.new("L", (20, 20)), max_pixels=100))


def test_over_the_byte_limit() -> None:
    assert "bytes, over the limit" in str(_error(_data_uri(_png((64, 64))), max_bytes=50))


@pytest.mark.parametrize(
    "value,text",
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("http://127.0.0.1/a.png", "private, loopback"),
        ("http://localhost:9/a.png", "private, loopback"),
        ("http://[::1]/a.png", "private, loopback"),
        ("http://169.254.169.254/latest/meta-data", "private, loopback"),
        ("http://10.1.2.3/a.png", "private, loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "private, loopback"),
        ("/no/such/file.png", "no such file"),
        (12, "unsupported input type"),
        (np.zeros((2, 2, 2), np.uint8), "not an image"),
    ],
)
def test_refused_inputs(value: object, text: str) -> None:
    """Private addresses are refused after resolution, before any connection (nothing listens there)."""
    assert text in str(_error(value))


def test_local_paths_can_be_disabled(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    assert "local paths are not accepted" in str(_error(str(path), allow_local_paths=False))


def test_address_classification() -> None:
    assert check_address("93.184.216.34") and check_address("2606:2800:220:1:248:1893:25c8:1946")
    for address in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.1.1", "100.64.0.1", "0.0.0.0",
                    "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "240.0.0.1"):
        assert not check_address(address), address


# ---------------------------------------------------------------------------------------------- local server


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A loopback server: reachable only with allow_private_urls=True, which is what these tests exercise."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.routes = {
        "/a.png": (200, {"Content-Type": "text/html"}, _png()),  # a wrong header does not matter: bytes decide
        "/big.png": (200, {"Content-Type": "image/png"}, _png((256, 256), "L") + b"\0" * 5000),
        "/page": (200, {"Content-Type": "image/png"}, b"<html>not an image</html>"),
        "/moved": (302, {"Location": "/a.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    yield base
    httpd.shutdown()
    httpd.server_close()


def test_url_success_and_redirect(server: str) -> None:
    for path in ("/a.png", "/moved"):
        image = load_image_input(server + path, allow_private_urls=True)
        assert image.size == (7, 5)


def test_url_refused_without_allow_private(server: str) -> None:
    assert "private, loopback" in str(_error(server + "/a.png"))


def test_url_errors(server: str) -> None:
    assert "bytes, over the limit" in str(_error(server + "/big.png", allow_private_urls=True, max_bytes=4000))
    assert "not an image" in str(_error(server + "/page", allow_private_urls=True))
    assert "HTTP 404" in str(_error(server + "/nothing", allow_private_urls=True))
    assert "scheme 'file'" in str(_error(server + "/to-file", allow_private_urls=True))
