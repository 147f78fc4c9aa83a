"""Webhook delivery (engine/runtime/webhooks.py): signed, retried with back-off, through the SSRF guard.

The end-to-end case (the official client's `submit(..., webhook_url=...)` against `engine serve`) is in
test_server_extras.py; here the sender runs against a real HTTP receiver on loopback and against scripted failures.
"""

import http.server
import json
import threading

import pytest

from engine.errors import InvalidRequestError
from engine.runtime.webhooks import WebhookSender, signature, verify_signature, webhook_body


class Receiver:
    """A loopback HTTP server that answers each POST with the next scripted status and records what it got."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.received = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        r = Receiver(statuses)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_delivery_retries_5xx_with_backoff_then_signs_each_attempt(receiver):
    r = receiver([503, 500, 200])
    sleeps = []
    sender = WebhookSender(key="server-key", allow_private=True, attempts=5, backoff_s=0.5, max_backoff_s=0.8,
                           sleep=sleeps.append)
    body = webhook_body("req-1", {"images": [{"url": "u"}]})
    delivery = sender.deliver(r.url, "req-1", body)
    assert delivery.delivered and delivery.attempts == 3 and delivery.status == 200
    assert sleeps == [0.5, 0.8]  # doubled, capped
    assert len(r.received) == 3
    for headers, raw in r.received:
        assert json.loads(raw) == {"request_id": "req-1", "gateway_request_id": "req-1", "status": "OK",
                                   "payload": {"images": [{"url": "u"}]}, "error": None}
        assert verify_signature("server-key", headers, raw)
        assert not verify_signature("other-key", headers, raw)
        assert not verify_signature("server-key", headers, raw + b" ")


def test_client_errors_are_final_and_attempts_are_bounded(receiver):
    r = receiver([404])
    sender = WebhookSender(key="k", allow_private=True, attempts=4, backoff_s=0, sleep=lambda s: None)
    d = sender.deliver(r.url, "req-2", webhook_body("req-2", {}))
    assert not d.delivered and d.attempts == 1 and d.status == 404
    r = receiver([500, 500, 500, 500, 500])
    d = sender.deliver(r.url, "req-3", webhook_body("req-3", {}))
    assert not d.delivered and d.attempts == 4 and len(r.received) == 4
    r = receiver([429, 200])
    assert sender.deliver(r.url, "req-4", webhook_body("req-4", {})).attempts == 2


def test_network_failures_are_retried_and_ssrf_refusals_are_not():
    calls = []

    def flaky(url, data, **kw):
        calls.append(kw["headers"])
        if len(calls) < 3:
            raise ConnectionRefusedError("refused")
        return 204

    sender = WebhookSender(key=None, attempts=5, backoff_s=0, sleep=lambda s: None, post=flaky)
    d = sender.deliver("https://hooks.example/x", "r", webhook_body("r", {}))
    assert d.delivered and d.attempts == 3
    assert "X-Fal-Webhook-Signature" not in calls[0]  # no key: unsigned
    guarded = WebhookSender(key="k", attempts=5, backoff_s=0, sleep=lambda s: None)  # private addresses refused
    d = guarded.deliver("http://127.0.0.1:9/hook", "r", webhook_body("r", {}))
    assert not d.delivered and d.attempts == 1 and "private" in d.error
    with pytest.raises(InvalidRequestError) as info:
        guarded.check("http://169.254.169.254/latest")
    assert info.value.field == "fal_webhook"


def test_error_payload_and_signature_format():
    from engine.errors import JobCancelledError

    body = webhook_body("r9", error=JobCancelledError("request cancelled"))
    assert body["status"] == "ERROR" and body["payload"]["error_type"] == "cancelled"
    sig = signature("k", "r9", "1700000000", b"{}")
    headers = {"X-Fal-Webhook-Request-Id": "r9", "X-Fal-Webhook-User-Id": "local",
               "X-Fal-Webhook-Timestamp": "1700000000", "X-Fal-Webhook-Signature": sig}
    assert verify_signature("k", headers, b"{}", now=1700000100)
    assert not verify_signature("k", headers, b"{}", now=1700001000)  # too old: replay refused
