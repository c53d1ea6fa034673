"""`graphconv report` in a real headless browser (Debian's chromium driven by Playwright, launched
with the system executable; .ci/run installs both): the page loads with no console errors and no
network request, clicking a layer reveals its kernels, and a screenshot is kept as a test artifact
(test-artifacts/report-lenet5.png)."""
import pathlib
import shutil

import pytest

from graphconv.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (.ci/run installs it)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")


def test_lenet5_report_in_a_headless_browser(tmp_path, capsys):
    page_path = tmp_path / "report.html"
    assert main(["report", "lenet5", "-o", str(page_path)]) == 0
    text = page_path.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text   # nothing fetched
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(page_path.as_uri())
        section = page.locator("details#layer-conv1")
        assert not section.evaluate("d => d.open")                  # sections start collapsed
        page.locator('tr.layer[data-layer="conv1"]').click()        # the layer table's conv1 row
        assert section.evaluate("d => d.open")
        kernel = section.locator("details.kernel").first
        assert kernel.is_visible() and "conv2d_direct_relu_max_pool2d_save" in kernel.get_attribute("data-kernel")
        assert "pool1.fused = conv1 -> relu1 -> pool1" in kernel.inner_text()        # its source's header
        assert page.locator('[data-node="pool1.fused"].hl').count() >= 1      # and its fused node lit
        page.locator('tr.layer[data-layer="conv2"]').click()          # conv2's gradient for its input
        page.locator('#layer-conv2 summary[data-kernel^="conv2d_backward_data"]').first.click()
        assert page.locator('.node-link[data-node="dpool1"].hl, .node[data-node="dpool1"].hl').count() >= 1
        page.fill("#search", "fc2")                                  # the search box filters the sections
        assert page.locator("details#layer-conv1").is_hidden() and page.locator("details#layer-fc2").is_visible()
        page.fill("#search", "")
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = false)")
        page.locator('tr.layer[data-layer="conv1"]').click()
        page.evaluate("document.querySelectorAll('#layer-conv1 details.kernel').forEach((d, i) => d.open = i === 0)")
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(artifacts / "report-lenet5.png"), full_page=True)   # table, graph, kernels
        browser.close()
    assert errors == [] and requests == []


def test_a_report_of_layers_with_odd_names_stays_interactive(tmp_path):
    """Layer names holding <!--<script>, quotes, a backslash or markup: the page's data keeps every < as
    \\u003c (a <!-- in it swallowed the page's script: nothing reacted to clicks) and the selectors
    escape the names (a quote threw in querySelectorAll); found by review."""
    model = tmp_path / "odd.py"
    model.write_text("import graphconv as gc\ndef build():\n    g = gc.Graph('odd')\n"
                     "    x = g.input('x', ('N', 1, 8, 8))\n"
                     "    h = g.relu(g.conv2d(x, 2, 3, padding=1, name='<!--<script>'), name='r\"q\\\\\\'é')\n"
                     "    g.output(g.linear(g.flatten(h), 3, name='<b>fc</b>'))\n    return g\n")
    page_path = tmp_path / "odd.html"
    assert main(["report", f"{model}:build", "--stage", "fused-train", "-o", str(page_path)]) == 0
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(page_path.as_uri())
        assert page.evaluate("typeof showLayer") == "function"
        for layer in ("<!--<script>", "<b>fc</b>"):
            page.evaluate("l => showLayer(l)", layer)
            assert page.evaluate("l => document.querySelectorAll('.hl').length", layer) >= 2, layer
        page.evaluate("n => showNode(n)", "r\"q\\'é")
        assert page.locator(".hl").count() >= 1
        browser.close()
    assert errors == []
