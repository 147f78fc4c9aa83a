"""Webhooks (`fal_webhook` on submit): the final payload POSTed to the caller's URL, signed, retried with back-off.

Body (fal's): `{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload", "error"}`. Every attempt goes
through the SSRF guard (engine/net.py): the host is resolved and checked again at delivery and the connection goes
to the checked address; redirects are not followed. A 2xx ends delivery; a 408, 429, 5xx or a network failure is
retried after `backoff_s`, doubling up to `max_backoff_s`, at most `attempts` times; any other answer (and a refused
address) ends it at once. Each outcome is logged.

Signature (when the server has a key): the headers fal sends, with an HMAC-SHA256 in place of fal's ED25519:
  X-Fal-Webhook-Request-Id, X-Fal-Webhook-User-Id ("local"), X-Fal-Webhook-Timestamp (unix seconds),
  X-Fal-Webhook-Signature = hex(HMAC-SHA256(key, f"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"))
where `key` is the server's API key. `verify_signature` is the receiver's side (usable as-is by a Python receiver).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .. import net
from ..errors import EngineError, InvalidRequestError

log = logging.getLogger(__name__)

USER_ID = "local"
RETRY_STATUSES = frozenset({408, 425, 429})
SIGNATURE_HEADERS = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp",
                     "x-fal-webhook-signature")
Poster = Callable[..., int]


def webhook_body(request_id: str, result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    """fal's webhook JSON for a finished request."""
    body: dict[str, Any] = {"request_id": request_id, "gateway_request_id": request_id}
    if error is None:
        body.update(status="OK", payload=result, error=None)
    else:
        error_type = error.error_type if isinstance(error, EngineError) else "internal_error"
        body.update(status="ERROR", payload={"detail": str(error), "error_type": error_type}, error=str(error))
    return body


def signature(key: str, request_id: str, timestamp: str, body: bytes, user_id: str = USER_ID) -> str:
    message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
    return hmac.new(key.encode("utf-8", "surrogateescape"), message, hashlib.sha256).hexdigest()


def signed_headers(key: str | None, request_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    headers = {"X-Fal-Webhook-Request-Id": request_id, "X-Fal-Webhook-User-Id": USER_ID}
    if key:
        timestamp = str(int(time.time() if now is None else now))
        headers["X-Fal-Webhook-Timestamp"] = timestamp
        headers["X-Fal-Webhook-Signature"] = signature(key, request_id, timestamp, body)
    return headers


def verify_signature(key: str, headers: Mapping[str, str], body: bytes, *, max_age_s: float = 300.0,
                     now: float | None = None) -> bool:
    """The receiver's check: the signature matches and the timestamp is within `max_age_s` of now."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        request_id, user_id, timestamp, given = (lower[h] for h in SIGNATURE_HEADERS)
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (KeyError, ValueError):
        return False
    expected = signature(key, request_id, timestamp, body, user_id)
    return age <= max_age_s and hmac.compare_digest(expected, given)


@dataclass
class Delivery:
    url: str
    request_id: str
    attempts: int = 0
    status: int | None = None  # the last HTTP status, None when no answer came
    delivered: bool = False
    error: str | None = None
    history: list[str] = field(default_factory=list)


@dataclass
class WebhookSender:
    """Delivers webhooks on background threads. `key`: the server's API key (signs; None: unsigned).
    `post` and `sleep` are the seams tests replace."""

    key: str | None = None
    allow_private: bool = False
    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 15.0
    post: Poster = net.post_json
    sleep: Callable[[float], Any] = time.sleep
    guard: net.Guard | None = None

    def deliver(self, url: str, request_id: str, body: dict[str, Any]) -> Delivery:
        """POST `body` until it is accepted, refused for good, or the attempts run out (blocking)."""
        data = json.dumps(body, default=str).encode()
        delivery = Delivery(url, request_id)
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            delivery.attempts = attempt
            retry = False
            try:
                status = self.post(url, data, field="fal_webhook", allow_private=self.allow_private,
                                   timeout_s=self.timeout_s, guard=self.guard,
                                   headers=signed_headers(self.key, request_id, data))
                delivery.status = status
                delivery.history.append(f"HTTP {status}")
                if 200 <= status < 300:
                    delivery.delivered, delivery.error = True, None
                    break
                retry = status >= 500 or status in RETRY_STATUSES
                delivery.error = f"answered HTTP {status}"
            except InvalidRequestError as e:  # the guard refused the address, or the URL is malformed: final
                delivery.error = str(e)
                delivery.history.append(f"refused: {e}")
            except Exception as e:  # noqa: BLE001 - network failures are retried
                delivery.error = f"{type(e).__name__}: {e}"
                delivery.history.append(delivery.error)
                retry = True
            if not retry or attempt == self.attempts:
                break
            self.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
        if delivery.delivered:
            log.info("webhook for %s delivered to %s (attempt %d)", request_id, url, delivery.attempts)
        else:
            log.warning("webhook for %s to %s not delivered after %d attempt(s): %s", request_id, url,
                        delivery.attempts, delivery.error)
        return delivery

    def check(self, url: str) -> None:
        """Refuse at submit what delivery would refuse (scheme, address): a 422 on `fal_webhook`."""
        net.check_url(url, field="fal_webhook", allow_private=self.allow_private, guard=self.guard)

    def send_job(self, url: str, job: Any) -> threading.Thread:
        """Deliver a finished job's webhook on a daemon thread."""
        body = webhook_body(job.id, job.result if job.error is None else None, job.error)
        thread = threading.Thread(target=self.deliver, args=(url, job.id, body), daemon=True,
                                  name=f"webhook-{job.id[:8]}")
        thread.start()
        return thread
