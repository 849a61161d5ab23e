"""ComfyUI's real web frontend, headless, driven through its own JavaScript API (for tests/api/test_frontend.py).

Browser: Debian's /usr/bin/chromium, driven by the PyPI `playwright` package (never `playwright install`).
Recipe: ../shared/specs/comfy_host.md §8 (written for frontend 1.32.9), re-checked on 1.48.7 (ComfyUI
v0.33.0), where it differs so:
- Every request to a host other than the loopback server is aborted; 1.48.7 makes none on start-up (its
  CSP, connect-src 'self', blocks registry look-ups before they leave the page).
- Ready: `app.isGraphReady` and `app.canvas` and the pack's node types registered (`app.graph` is also
  fine; `app.rootGraph` logs a console error when read before the graph exists).
- The Templates dialog a fresh user gets is no PrimeVue `.p-dialog` any more but a reka-ui
  `[role=dialog][aria-labelledby=global-workflow-template-selector]`; its `button[aria-label="Close dialog"]`
  closes it (Escape does too now).
- Missing nodes, models and media no longer open dialogs (`app.showMissingModelsError` is gone):
  `loadGraphData` puts them in the Pinia stores `missingNodesError`, `missingModel`, `missingMedia` and
  opens the error overlay (`executionError.isErrorOverlayOpen`); the model and media checks finish
  asynchronously (a folder-path request, a /view request), hence `settle()` after each load.
- Every `loadGraphData` opens a new workflow tab; node ids come back as strings.
- Playwright's sync API delivers console events only while it runs a call: wait with
  `page.wait_for_timeout`, never `time.sleep`, or messages are lost.
- A missing model whose node carries `properties.models` gets that entry's `url` and `directory` (matched by
  file name and folder); the page then asks for the file's size with a HEAD to the URL, which its CSP
  (connect-src 'self') refuses before it leaves the page — two console errors per file, no request.
- A pack node's help is `/extensions/<pack>/docs/<node id>/<locale>.md`, else `.../docs/<node id>.md` (the
  first is a 404 for a pack with one language: one console error); it shows in the right side panel's Info
  tab, opened by the selection toolbox's Info button, rendered into `.markdown-content`.
"""
from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_NODE = "DiTControl_PixArtDiTLoader"     # registered once the pack's nodes are in the frontend
READY = f"""() => !!(window.app && app.isGraphReady && app.canvas && window.LiteGraph
                    && LiteGraph.registered_node_types['{PACK_NODE}'])"""
TEMPLATES_DIALOG = "[role=dialog][aria-labelledby=global-workflow-template-selector]"

# The frontend's own console noise while it starts for a fresh user — the same with
# --disable-all-custom-nodes, so none of it is ours. Tolerated during start-up only; after it every
# console error (and warning) fails. 404s for a fresh user's files and folders that do not exist yet:
NOISE_404 = ("/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json",
             "/api/userdata?dir=workflows&", "/api/userdata?dir=subgraphs&")
# ... and the app's rootGraph getter (console.error) read by the frontend itself before the graph exists:
NOISE_TEXT = ("ComfyApp graph accessed before initialization",)

STORES = """() => {
  const s = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
  const nodes = s.get('missingNodesError').missingNodesError;
  return {missing_nodes: nodes ? nodes.nodeTypes.map(t => typeof t == 'string' ? t : t.type) : [],
          missing_models: (s.get('missingModel').missingModelCandidates || []).map(c =>
          `${c.nodeType}.${c.widgetName}=${c.name}`),
          missing_model_links: (s.get('missingModel').missingModelCandidates || []).map(c => ({
              node_type: c.nodeType, widget: c.widgetName, name: c.name, directory: c.directory ?? null,
              url: c.url ?? null})),
          missing_media: (s.get('missingMedia').missingMediaCandidates || []).map(c =>
          `${c.nodeType}.${c.widgetName}=${c.name}`),
          missing_nodes_hook: window.__ditMissingNodes || [],
          error_overlay: s.get('executionError').isErrorOverlayOpen,
          dialogs: [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText.slice(0, 200))};
}"""

NODES = """() => app.graph._nodes.map(n => ({
  id: String(n.id), type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
  title_height: LiteGraph.NODE_TITLE_HEIGHT, collapsed: !!(n.flags && n.flags.collapsed),
  widgets: (n.widgets || []).map(w => [w.name, w.value === undefined ? null : w.value])}))"""

# MarkdownNote nodes whose rendered text scrolls inside the node (does not show whole)
NOTES_CUT = """() => app.graph._nodes.filter(n => n.type === 'MarkdownNote').flatMap(n => {
  const shown = n.widgets[0].element.querySelector('.ProseMirror');
  return !shown ? [`node ${n.id}: no rendered text`]
       : shown.scrollHeight > shown.clientHeight + 1 || shown.scrollWidth > shown.clientWidth + 1
       ? [`node ${n.id} (${n.title}): text ${shown.scrollWidth} x ${shown.scrollHeight} px in a box of `
          + `${shown.clientWidth} x ${shown.clientHeight}`] : [];
})"""

# what must be still for a graph to count as rendered: node boxes, image previews loaded, a drawn frame
LAYOUT = """async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return JSON.stringify(app.graph._nodes.map(n => [n.id, n.pos[0], n.pos[1], n.size[0], n.size[1],
    (n.imgs || []).map(i => i.complete && i.naturalWidth)]));
}"""


class FrontendError(RuntimeError):
    pass


class FrontendPage:
    """`with FrontendPage(server) as fe:` — one browser and page on `server`'s web UI; `fe.problems()`
    returns (and forgets) the page errors and console messages recorded since the last call."""

    def __init__(self, server, viewport=(2560, 1440), timeout: float = 60.0, beside: "FrontendPage | None" = None):
        """`beside`: an open FrontendPage whose browser this page opens in (Playwright's sync API runs one
        instance per thread); closing this page then leaves that browser open."""
        self.server = server
        self.beside = beside
        self.viewport = {"width": viewport[0], "height": viewport[1]}
        self.timeout = timeout
        self._problems: list[str] = []
        self._noise: list[str] = []
        self._starting = True
        self._inflight = 0
        self._last_net = time.monotonic()
        self._pw = self.browser = self.page = None

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self):
        from playwright.sync_api import sync_playwright
        if self.beside is None:
            self._pw = sync_playwright().start()
        try:
            if self.beside is None:
                self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            else:
                self.browser = self.beside.browser
            self.page = self.browser.new_page(viewport=self.viewport)     # a context of its own
            self._hook()
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.beside is not None:
            if self.page is not None:
                self.page.context.close()
        elif self.browser is not None:
            self.browser.close()
        if self._pw is not None:
            self._pw.stop()
        self.browser = self._pw = self.page = None

    def _hook(self):
        page, host = self.page, urllib.parse.urlparse(self.server.url).netloc

        def route(r):
            if urllib.parse.urlparse(r.request.url).netloc == host:
                r.continue_()
            else:
                self._problems.append(f"request off the machine (aborted): {r.request.method} {r.request.url}")
                r.abort()

        page.route("**/*", route)
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self._problems.append(f"page error: {e}"))
        page.on("crash", lambda *_: self._problems.append("page crashed"))

        def net(delta):
            def handler(*_):
                self._inflight += delta
                self._last_net = time.monotonic()
            return handler

        page.on("request", net(+1))
        page.on("requestfinished", net(-1))
        page.on("requestfailed", net(-1))

    def _on_console(self, msg):
        if msg.type not in ("error", "warning"):
            return
        url = (msg.location or {}).get("url", "")
        where = urllib.parse.urlparse(url)
        path = where.path + (f"?{where.query}" if where.query else "")
        text = f"console {msg.type}: {msg.text}" + (f" [{path}]" if url else "")
        if self._starting:
            if msg.type == "warning":            # start-up deprecation notices of the frontend's own code
                self._noise.append(text)
                return
            if msg.text in NOISE_TEXT or (msg.text.startswith("Failed to load resource: the server responded "
                                                              "with a status of 404")
                                          and any(path == p or (p.endswith("&") and path.startswith(p))
                                                  for p in NOISE_404)):
                self._noise.append(text)
                return
        self._problems.append(text)

    def _open(self):
        fresh = not self.server.get("/api/settings").get("Comfy.TutorialCompleted", False)
        self.page.goto(self.server.url, timeout=self.timeout * 1000)
        self.page.wait_for_function(READY, timeout=self.timeout * 1000)
        self.page.evaluate("""() => {            // record the missing-node hook too (loadApiJson uses it)
            window.__ditMissingNodes = [];
            const show = app.showMissingNodesError.bind(app);
            app.showMissingNodesError = (types, ...rest) => { window.__ditMissingNodes.push(...types); return
            show(types, ...rest); };
        }""")
        if fresh:   # a fresh user: the frontend opens the Templates browser once the blank workflow is loaded
            dialog = self.page.locator(TEMPLATES_DIALOG)
            dialog.wait_for(state="visible", timeout=self.timeout * 1000)
            dialog.locator('button[aria-label="Close dialog"]').click()
            dialog.wait_for(state="detached", timeout=10_000)
        # screenshots: no minimap over the bottom right corner, and text at any zoom (FitView zooms wide
        # graphs out below the font size where the canvas stops drawing text)
        self.page.evaluate("""async () => {
            await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
            await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0); }""")
        self.settle()
        self._starting = False

    # -- state ------------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Page errors and console errors/warnings since the last call (start-up noise excluded)."""
        self.page.wait_for_timeout(50)        # let queued console events in
        out, self._problems = self._problems, []
        return out

    def startup_noise(self) -> list[str]:
        return list(self._noise)

    def settle(self, quiet: float = 0.3, timeout: float = 20.0):
        """Wait until no request is in flight for `quiet` seconds and the node boxes and image previews
        stay the same across two drawn frames."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            self.page.wait_for_timeout(100)
            layout = self.page.evaluate(LAYOUT)
            if layout == last and self._inflight <= 0 and time.monotonic() - self._last_net >= quiet:
                return
            if time.monotonic() > deadline:
                raise FrontendError(f"the page did not settle in {timeout}s ({self._inflight} requests in flight)")
            last = layout

    def missing(self) -> dict:
        """What the frontend flagged for the loaded graph: node types, models, media, open overlay/dialogs."""
        return self.page.evaluate(STORES)

    def nodes(self) -> list[dict]:
        """Every node on the canvas: id, type, title, pos, size, title_height, widgets [[name, value]]."""
        return self.page.evaluate(NODES)

    def notes_cut(self) -> list[str]:
        """The Markdown notes whose text does not show whole in their node."""
        return self.page.evaluate(NOTES_CUT)

    # -- actions ----------------------------------------------------------------------------------

    def load(self, ui: dict):
        """Load a UI workflow the way the page does (app.loadGraphData) and wait until it is rendered."""
        self.page.evaluate("() => { window.__ditMissingNodes = []; }")
        self.page.evaluate("async (g) => { await app.loadGraphData(g); }", ui)
        self.settle()

    def graph_to_prompt(self) -> dict:
        """`(await app.graphToPrompt()).output`: what "Export (API)" writes and the page queues."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def screenshot(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.evaluate("() => app.canvas.setDirty(true, true)")
        self.settle(quiet=0.1)
        self.page.screenshot(path=str(path))

    def open_help(self, node_id: str, title: str) -> dict:
        """Select a node and click the selection toolbox's Info button, as a user does; once the help page titled
        `title` is rendered: {"text": its innerText, "html": its innerHTML, "links": [[text, href]]}."""
        # in the middle of the canvas, so that the toolbox above it is clear of the side bars
        self.page.evaluate("""(id) => { const n = app.graph.getNodeById(id); app.canvas.centerOnNode(n);
                                        app.canvas.deselectAll(); app.canvas.selectNode(n);
                                        app.canvas.setDirty(true, true); }""", node_id)
        self.settle()
        self.page.locator("[data-testid=info-button]").first.click(timeout=self.timeout * 1000)
        self.page.wait_for_function(
            """(title) => { const h = document.querySelector('.markdown-content h1');
                            return !!h && h.innerText.trim() === title; }""", arg=title, timeout=self.timeout * 1000)
        self.settle()
        return self.page.evaluate("""() => { const c = document.querySelector('.markdown-content');
            return {text: c.innerText, html: c.innerHTML,
                    links: [...c.querySelectorAll('a')].map(a => [a.innerText, a.getAttribute('href')])}; }""")

    def open_missing_models(self) -> list[str]:
        """Open the error overlay's 'see errors' (the Errors tab of the right side panel, as a user does) and
        return the file names its Missing Models list offers to download."""
        self.page.locator("[data-testid=error-overlay-see-errors]").click(timeout=self.timeout * 1000)
        self.page.locator("[data-testid=missing-model-download]").first.wait_for(timeout=self.timeout * 1000)
        self.settle()
        return self.page.evaluate("""() => [...document.querySelectorAll('[data-testid=missing-model-download]')]
                                          .map(b => b.getAttribute('aria-label').replace(/^Download /, ''))""")

    def screenshot_page(self, path: Path):
        """The page as the user sees it now (side panels as they are, the canvas not refitted)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.settle(quiet=0.1)
        self.page.screenshot(path=str(path))

    def queue(self) -> dict:
        """Queue the loaded graph from the page (app.queuePrompt); the server's answer to POST /prompt."""
        with self.page.expect_response(lambda r: urllib.parse.urlparse(r.url).path in ("/api/prompt", "/prompt")
                                       and r.request.method == "POST", timeout=self.timeout * 1000) as answer:
            self.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
        response = answer.value
        body = response.json()
        if response.status != 200:
            raise FrontendError(f"POST /prompt from the page answered {response.status}: {json.dumps(body)[:2000]}")
        return body

    def wait_for_output(self, node_id: str, timeout: float = 60.0) -> dict:
        """The outputs the page received over its websocket for a node (app.nodeOutputs)."""
        self.page.wait_for_function(
            "(id) => { const o = app.nodeOutputs || {}; "
            "return Object.keys(o).some(k => String(k) === id || String(k).endsWith(':' + id)); }",
            arg=node_id, timeout=timeout * 1000)
        return self.page.evaluate(
            "(id) => { const o = app.nodeOutputs; "
            "const k = Object.keys(o).find(k => String(k) === id || String(k).endsWith(':' + id)); return o[k]; }",
            node_id)
