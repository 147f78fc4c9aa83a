"""Short-lived signed tokens: fal's realtime tokens (`POST /tokens/`) and the storage tokens of its CDN upload flow.

A token is a JWT (HS256) signed with a key derived from the server's API key (or, on a server without one, a random
key made at start-up), so tokens need no server-side table and die with the key. Claims: `scope` (what it is for:
"realtime" or "storage"), `apps` (the app ids or aliases it may open; fal's clients ask for the alias, e.g.
"fast-lightning-sdxl" or "flux"), `iat`, `exp`, `jti`. Verification checks the signature in constant time, the
algorithm, the scope, the expiry and the app.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import InvalidRequestError, UnauthorizedError

MIN_TTL_S = 1
MAX_TTL_S = 3600
DEFAULT_TTL_S = 120  # fal's clients ask for 120 s
MAX_APPS = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def app_alias(app_id: str) -> str:
    """fal's alias of an app id: the second segment (`fal-ai/flux/schnell` -> `flux`)."""
    parts = app_id.strip("/").split("/")
    return parts[1] if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class Claims:
    scope: str
    apps: tuple[str, ...]
    issued_at: float
    expires_at: float
    token_id: str

    def allows(self, app_id: str) -> bool:
        """An app is allowed when the token names its full id, its owner/alias, or its alias."""
        app_id = app_id.strip("/")
        parts = app_id.split("/")
        names = {app_id, app_alias(app_id), "/".join(parts[:2])}
        return bool(names & set(self.apps))


class TokenSigner:
    """Issues and verifies tokens. `secret`: the server's API key (None: a random one, valid for this process)."""

    def __init__(self, secret: str | None = None, *, clock: Any = time.time):
        material = secret.encode("utf-8", "surrogateescape") if secret else secrets.token_bytes(32)
        # derived, so a token's key is never the API key itself
        self._key = hmac.new(material, b"engine-token-signing-v1", hashlib.sha256).digest()
        self._clock = clock

    def issue(self, scope: str, apps: Iterable[str] = (), ttl_s: float = DEFAULT_TTL_S) -> tuple[str, Claims]:
        now = self._clock()
        claims = Claims(scope, tuple(apps), now, now + ttl_s, secrets.token_urlsafe(12))
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        payload = _b64(json.dumps({"scope": claims.scope, "apps": list(claims.apps), "iat": int(now),
                                   "exp": round(claims.expires_at, 3), "jti": claims.token_id},
                                  separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}"
        signature = _b64(hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256).digest())
        return f"{signing_input}.{signature}", claims

    def verify(self, token: str, scope: str, app_id: str | None = None) -> Claims:
        """The token's claims, or `UnauthorizedError` (401) saying what is wrong (never which part of a forged token was)."""
        try:
            header_b64, payload_b64, signature_b64 = token.split(".")
            signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
            expected = hmac.new(self._key, signing_input, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(signature_b64)):
                raise ValueError("signature")
            if json.loads(_unb64(header_b64)).get("alg") != "HS256":
                raise ValueError("alg")
            payload = json.loads(_unb64(payload_b64))
            claims = Claims(str(payload["scope"]), tuple(str(a) for a in payload["apps"]), float(payload["iat"]),
                            float(payload["exp"]), str(payload["jti"]))
        except (ValueError, KeyError, TypeError, UnicodeError, AttributeError):
            raise UnauthorizedError("invalid token") from None
        if claims.scope != scope:
            raise UnauthorizedError(f"this token is not valid for {scope}")
        if self._clock() >= claims.expires_at:
            raise UnauthorizedError("token expired")
        if app_id is not None and not claims.allows(app_id):
            raise UnauthorizedError(f"this token is not valid for {app_id}")
        return claims


def parse_token_request(body: Any) -> tuple[list[str], float]:
    """fal's `POST /tokens/` body: `{allowed_apps: [alias, ...], token_expiration: seconds}` -> (apps, ttl)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object", "{allowed_apps: [...], token_expiration: s}")
    apps = body.get("allowed_apps")
    if not isinstance(apps, list) or not apps or len(apps) > MAX_APPS or not all(
            isinstance(a, str) and 0 < len(a) <= 200 for a in apps):
        raise InvalidRequestError("allowed_apps", "must be a non-empty list of app ids or aliases",
                                  f"1 to {MAX_APPS} strings")
    ttl = body.get("token_expiration", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise InvalidRequestError("token_expiration", "must be a number of seconds", f"{MIN_TTL_S} to {MAX_TTL_S}")
    return [a.strip("/") for a in apps], float(ttl)
