"""API keys: with DDIM_API_KEYS or DDIM_API_KEYS_FILE set, every work and job endpoint needs
`Authorization: Bearer <key>`. Keys are compared as SHA-256 digests in constant time, and only a key id (the
first 12 hex digits of the digest) ever reaches logs, metrics or the job store."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/static/", "/playground/", "/favicon.ico")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_digests(keys: str, keys_file: Path | None) -> list[str]:
    """The accepted keys' SHA-256 digests: DDIM_API_KEYS (comma-separated) and the file's lines (a key, or
    `sha256:<hex>` for a key given only by its digest; # comments and blank lines skipped)."""
    out = [digest(k.strip()) for k in keys.split(",") if k.strip()]
    if keys_file is not None:
        for line in keys_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("sha256:"):
                hexdigest = line.removeprefix("sha256:").lower()
                if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                    raise ValueError(f"{keys_file}: {line[:20]}... is not a sha256 hex digest")
                out.append(hexdigest)
            elif line:
                out.append(digest(line))
    return out


class ApiKeys:
    """ASGI middleware: 401 with WWW-Authenticate: Bearer unless the request carries an accepted key."""

    def __init__(self, app: ASGIApp, digests: list[str], metrics_auth: bool = False) -> None:
        self.app, self.digests, self.metrics_auth = app, [bytes.fromhex(d) for d in digests], metrics_auth

    def _open(self, path: str) -> bool:
        if path == "/metrics":
            return not self.metrics_auth
        return path == "/" or path.startswith(OPEN)

    def key_id(self, header: str) -> str | None:
        """The key id of an accepted bearer key; None otherwise. Every accepted digest is compared (constant time)."""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        given = hashlib.sha256(key.strip().encode()).digest()
        match = False
        for d in self.digests:
            match |= hmac.compare_digest(given, d)
        return given.hex()[:12] if match else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), "")
        key_id = self.key_id(header)
        if key_id is None:
            body = json.dumps({"detail": "missing or wrong API key: send Authorization: Bearer <key>" if header
                               else "this server needs an API key: send Authorization: Bearer <key>"}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="ddim-serve"')]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)
