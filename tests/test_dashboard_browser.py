"""The dashboard in a real headless browser: Debian's chromium driven by Playwright (never Playwright's
own browser download). Setup: `apt-get install -y chromium` and `pip install playwright`.

Set SAE_DIST_SCREENSHOTS=<folder> to keep the screenshots (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import shutil
from threading import Thread

import pytest
from test_features import build_tiny_dashboard, minilm_tokenizer, tiny_gpt2  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")


def test_browser_searches_the_index_opens_a_feature_and_sees_highlighted_contexts(tmp_path, tiny_gpt2):  # noqa: F811
    from sae_dist.features.serve import make_server

    site = build_tiny_dashboard(tmp_path, tiny_gpt2)
    summary = json.load(open(os.path.join(site, "features.json")))
    fid, _, _, fires_on = next(row for row in summary if row[1] > 0 and row[3])
    word = fires_on.split()[0]
    shots = os.environ.get("SAE_DIST_SCREENSHOTS", str(tmp_path))
    os.makedirs(shots, exist_ok=True)
    server = make_server(site, port=0)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            rows = page.locator("#list tbody tr")
            assert rows.count() == len(summary)
            page.fill("#search", word)
            sync_api.expect(page.locator("#count")).not_to_have_text(f"{len(summary)} of {len(summary)} features")
            assert 0 < rows.count() < len(summary)
            assert all(word in rows.nth(i).inner_text() for i in range(rows.count()))
            page.fill("#search", str(fid))
            sync_api.expect(rows).to_have_count(1)
            page.screenshot(path=os.path.join(shots, "dashboard_index.png"))
            page.click(f"a.feature[href='f/{fid}.html']")
            page.wait_for_url(f"**/f/{fid}.html")
            assert page.locator("h1").inner_text() == f"Feature {fid}"
            lit = page.locator("#top .tok.on")
            assert lit.count() > 0 and "rgba(234, 88, 12" in lit.first.evaluate("e => getComputedStyle(e).backgroundColor")
            assert page.locator("#top .tok.max").count() == page.locator("#top .ctx").count()
            assert page.locator("#samples .tok.on").count() > 0
            page.screenshot(path=os.path.join(shots, "dashboard_feature.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert os.path.getsize(os.path.join(shots, "dashboard_feature.png")) > 10_000
