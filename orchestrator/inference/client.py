"""A small Python client of the completions server (standard library only).

    from orchestrator.inference.client import Client
    c = Client("http://127.0.0.1:8000")
    c.complete("ROMEO:", max_tokens=32, temperature=0)["choices"][0]["text"]
    for piece in c.stream("ROMEO:", max_tokens=32): print(piece, end="")
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator


class ServerError(Exception):
    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.param = err.get("param")
        super().__init__(f"HTTP {status}: {err.get('message', body)}")


class Client:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _open(self, path: str, body: bytes | None = None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"message": raw.decode(errors="replace")}}
            raise ServerError(exc.code, payload) from None

    def post(self, path: str, payload) -> dict:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with self._open(path, body) as resp:
            return json.loads(resp.read())

    def complete(self, prompt: str | list[str], **options) -> dict:
        return self.post("/v1/completions", {"prompt": prompt, **options})

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Text pieces as the server streams them (server-sent events)."""
        with self._open("/v1/completions", json.dumps({"prompt": prompt, "stream": True, **options}).encode()) as resp:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(503, chunk)
                yield chunk["choices"][0]["text"]

    def get(self, path: str) -> dict:
        with self._open(path) as resp:
            return json.loads(resp.read())

    def health(self) -> dict:
        return self.get("/health")

    def metrics(self) -> str:
        with self._open("/metrics") as resp:
            return resp.read().decode()
