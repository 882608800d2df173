"""The playground page at `/` of `loraplex serve`: self-contained, and in a real headless browser (Debian's
chromium) it lists the models and, run from its query string, fills each model's panel with the streamed answer,
the same text the API returns for the same greedy request."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
import time
from pathlib import Path

import pytest

from test_serve import run, start  # noqa: F401  (the module's trained two-adapter run and the loopback server)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Repeat the word apple."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def site(run):  # noqa: F811
    from loraplex.serving import app

    run_dir, merged, home = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        asgi = app(run_dir, [merged], max_tokens_limit=48, batch_wait_s=0.05)
    url, stop = start(asgi)
    yield url.removesuffix("/v1")
    stop()


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=30) as res:
        return res.headers.get("content-type", ""), res.read().decode("utf-8")


def answer(site: str, model: str) -> tuple[str, str, str]:
    """(model that answered, text, finish reason) of the API's own greedy, non-streamed answer."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    req = urllib.request.Request(f"{site}/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as res:
        data = json.loads(res.read())
    return data["model"], data["choices"][0]["message"]["content"], data["choices"][0]["finish_reason"]


def test_the_page_is_self_contained(site):
    kind, page = get(site + "/")
    assert kind.startswith("text/html")
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must not load anything"
    assert "/v1/chat/completions" in page and "stream: true" in page and "x-loraplex-route" in page


class Browser:
    """Headless chromium driven over --remote-debugging-pipe (CDP: JSON messages ending in NUL on fds 3 and 4)."""

    def __init__(self, browser: str, profile: Path, url: str):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire():  # the child reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,800",
                                      "--remote-debugging-pipe", url], preexec_fn=wire, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._id = b"", 0
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 16)
                assert chunk, "the browser closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, expression: str):
        return self.send("Runtime.evaluate", self.session, expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.eval(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._out)
        os.close(self._in)


def test_the_page_compares_models_in_a_browser(site, tmp_path):
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if browser is None:
        pytest.skip("no chromium found (apt-get install chromium); the playground was not opened in a browser")
    models = [m["id"] for m in json.loads(get(site + "/v1/models")[1])["data"]]
    assert models[0] == "base" and "en" in models and "zh" in models and "auto" in models
    assert any(m.startswith("merged:") for m in models)
    query = urllib.parse.urlencode({"models": ",".join(models), "max_tokens": MAX_TOKENS, "temperature": 0})
    page = Browser(browser, tmp_path / "profile", f"{site}/?{query}")
    try:
        page.wait_for("document.body.dataset.state === 'ready'")
        listed = page.eval("[...document.querySelectorAll('#models input:checked')].map(i => i.value)")
        assert listed == models
        page.eval(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}; "
                  "document.getElementById('go').click()")
        page.wait_for("document.body.dataset.state === 'done'")
        panels = page.eval("[...document.querySelectorAll('.panel')].map(p => ({model: p.dataset.model, "
                           "state: p.dataset.state, routed: p.dataset.routed || null, "
                           "route: p.querySelector('.route').textContent, text: p.querySelector('pre').textContent}))")
        shot = base64.b64decode(page.send("Page.captureScreenshot", page.session, format="png")["data"])
    finally:
        page.close()
    assert [p["model"] for p in panels] == models
    assert sum(bool(panel["text"]) for panel in panels) >= len(panels) - 1, panels  # the page shows answers
    for panel in panels:
        answered_by, expected, finish = answer(site, panel["model"])
        # an empty answer only where the model ended its turn at once (a tiny random adapter may)
        assert panel["state"] == "done" and panel["text"] == expected and (expected or finish == "stop"), \
            (panel, expected, finish)
        if panel["model"] == "auto":
            assert panel["routed"] == answered_by and panel["route"].startswith("→ " + answered_by)
    (tmp_path / "playground.png").write_bytes(shot)
    from PIL import Image

    with Image.open(tmp_path / "playground.png") as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 50, "the screenshot is (nearly) blank"
