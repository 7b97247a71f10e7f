"""A GitLab instance as far as its ID tokens go, for the metaproxy test bed.

GitLab itself cannot run here; this speaks its wire format: the OpenID
discovery document at /.well-known/openid-configuration, the JWKS at
/oauth/discovery/keys (RSA keys with kid, use and alg, as GitLab publishes
them), and RS256 JWTs with GitLab's claims. Three RSA keys are made at
start: "a" and "b" (the instance's, for rotation) and "rogue" (never
published). Which keys the JWKS lists can be changed, to rotate.

Test-only endpoints, under /-/test/:
  POST /-/test/mint     {"key": "a", "kid": "...", "claims": {...}} -> the JWT
  POST /-/test/publish  ["a", "b"]                                   -> 204
  GET  /-/test/stats    {"jwks_fetches": N, "discovery_fetches": N}

Usage: python fake_gitlab.py HOST PORT
"""
import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


KEYS = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("a", "b", "rogue")}
STATE = {"published": ["a"], "jwks_fetches": 0, "discovery_fetches": 0}
LOCK = threading.Lock()


def jwk(name: str) -> dict:
    numbers = KEYS[name].public_key().public_numbers()
    return {"kty": "RSA", "kid": f"key-{name}", "e": uint(numbers.e), "n": uint(numbers.n), "use": "sig", "alg": "RS256"}


def mint(key: str, kid: str, claims: dict) -> str:
    header = {"kid": kid, "typ": "JWT", "alg": "RS256"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = KEYS[key].sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


class Handler(BaseHTTPRequestHandler):
    issuer = ""

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-gitlab: " + (fmt % args) + "\n")

    def reply(self, status: int, body: bytes = b"", content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/.well-known/openid-configuration":
            with LOCK:
                STATE["discovery_fetches"] += 1
            doc = {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/oauth/authorize",
                "token_endpoint": f"{self.issuer}/oauth/token",
                "userinfo_endpoint": f"{self.issuer}/oauth/userinfo",
                "jwks_uri": f"{self.issuer}/oauth/discovery/keys",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "profile", "email"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "sub_legacy", "name", "nickname", "email"],
            }
            self.reply(200, json.dumps(doc).encode())
        elif self.path == "/oauth/discovery/keys":
            with LOCK:
                STATE["jwks_fetches"] += 1
                keys = [jwk(name) for name in STATE["published"]]
            self.reply(200, json.dumps({"keys": keys}).encode())
        elif self.path == "/-/test/stats":
            with LOCK:
                stats = {k: STATE[k] for k in ("jwks_fetches", "discovery_fetches")}
            self.reply(200, json.dumps(stats).encode())
        else:
            self.reply(404, b'{"error":"404 Not Found"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")
        if self.path == "/-/test/mint":
            token = mint(body["key"], body.get("kid", f"key-{body['key']}"), body["claims"])
            self.reply(200, token.encode(), "text/plain")
        elif self.path == "/-/test/publish":
            with LOCK:
                STATE["published"] = list(body)
            self.reply(204)
        else:
            self.reply(404)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    Handler.issuer = f"http://{host}:{port}"
    server = ThreadingHTTPServer((host, port), Handler)
    sys.stderr.write(f"fake-gitlab: issuer {Handler.issuer}\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
