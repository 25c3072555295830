"""GET /, the playground page: served by the app, and driven in a real headless Chromium.

The browser test runs against the real service (Ray head + `serving/run.py`, auth on, a
checkpoint trained to fill in the middle), types code, puts the cursor inside it, starts a greedy
completion, waits for the streamed text and compares it with the API's own greedy completion for
the same prefix and suffix. Chromium and its driver are Debian packages that
`scripts/setup.sh --dev` installs; without them the test fails and says so (it must run in CI).
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.api import build_app
from app.playground import PAGE
from serving.local import LocalBackend

API_KEY = "playground-key-7e1"
PROMPT = "def parse(line):\n"
SUFFIX = "    return x\n"  # the text after the cursor: sent as `suffix` to a FIM model


# ---- the route, in-process --------------------------------------------------------------------


def test_page_is_served_without_auth_and_fetches_nothing_from_the_network(engine):
    client = TestClient(build_app(LocalBackend(engine), api_key="k"))
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == PAGE.read_text(encoding="utf-8")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # the browser enforces it
    # No external references at all: every src/href is local or absent.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text, re.I)
    assert client.get("/v1/models").status_code == 401  # the API behind it still needs the key
    # The page sends a suffix only when the model says it can infill; this one cannot.
    models = client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
    assert models["data"][0]["infill"] is False


# ---- the page in a real browser ------------------------------------------------------------------
