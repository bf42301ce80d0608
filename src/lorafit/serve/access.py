"""Who may talk to `lorafit serve`: Host allow-list, Origin / CORS, API key. No HTTP here, only the decisions.

A server on 127.0.0.1 is reachable from every web page the user opens: a page cannot read a cross-origin
answer without CORS, but it can still *send* a "simple" request (text/plain POST), and with DNS rebinding
(evil.example resolving to 127.0.0.1) even read one. So, as Jupyter and Ollama do: the Host header must
name this machine (loopback names unless --allowed_hosts says otherwise), a request from another page
(an Origin header) is refused unless --cors_origins lists it, and POST bodies must be application/json
(which a page cannot send cross-origin without a preflight that we refuse). --api_key adds a Bearer token.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Access:
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_NAMES))
    """Host header names accepted ('*': any)."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins (scheme://host[:port]) whose pages may call the API ('*': any)."""
    api_key: str | None = None
    """Bearer token every /v1 request must carry; None: no key."""

    @classmethod
    def build(cls, bind_host: str, allowed_hosts: str | None, cors_origins: str | None, api_key: str | None):
        hosts = _split(allowed_hosts) or list(LOOPBACK_NAMES)
        if not allowed_hosts and not _is_loopback(bind_host) and bind_host not in ("0.0.0.0", "::"):
            hosts.append(bind_host)  # --host 192.168.1.5: its own address is how clients name it
        return cls(allowed_hosts=[h.lower() for h in hosts], cors_origins=_split(cors_origins), api_key=api_key or None)

    def host_ok(self, host_header: str | None) -> bool:
        """A missing Host (HTTP/1.0 tools) is accepted: browsers, the rebinding risk, always send one."""
        if host_header is None or "*" in self.allowed_hosts:
            return True
        name = _host_name(host_header)
        return name in self.allowed_hosts or (name == "::1" and "[::1]" in self.allowed_hosts)

    def origin_ok(self, origin: str | None) -> bool:
        """No Origin (curl, SDKs), this server's own page (an allowed host), or a listed CORS origin."""
        if origin is None:
            return True
        if self.cors_allows(origin):
            return True
        if origin == "null":  # sandboxed frames and file:// pages
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and self.host_ok(parts.netloc)

    def cors_allows(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.cors_origins or origin.rstrip("/") in self.cors_origins)

    def cors_headers(self, origin: str | None) -> dict[str, str]:
        if not self.cors_allows(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600"}

    def authorized(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time taken does not tell how many leading characters were right
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _split(value: str | None) -> list[str]:
    return [v.strip().rstrip("/") for v in (value or "").split(",") if v.strip()]


def _host_name(netloc: str) -> str:
    """'Localhost:8000' -> 'localhost'; '[::1]:8000' -> '::1'."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
