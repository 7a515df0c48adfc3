"""The artist's path in a real browser: ComfyUI's own frontend (the comfyui-frontend-package that ComfyUI 0.3.75
pins), in headless Chromium from Debian (/usr/bin/chromium), driven by Playwright from PyPI.

For every shared workflow: load it as the frontend does (app.loadGraphData), no missing-nodes dialog, no node type
unknown to LiteGraph, no node in red; queue it with the Run button; the Save Image node shows the PNG that the
prompt wrote. Each run leaves a screenshot in pytest's tmp folder (the path is printed). With
UPDATE_DOCS_IMAGES=1 the default workflow's framed screenshot also replaces docs/images/comfyui-graph.png.
Also: a node's help page opens in the frontend from the selection toolbox's info button (web/docs/<node>.md).
"""
import copy
import glob
import json
import os
import re
import shutil
import time

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright

from conftest import DEFAULT_WORKFLOW, ROOT, WORKFLOW_DIR

CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright's own browser download cannot work here
VIEWPORT = {"width": 1600, "height": 900}
DOCS_IMAGE = os.path.join(ROOT, "docs", "images", "comfyui-graph.png")
WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))

GRAPH_STATE = """() => {
  const nodes = app.graph.nodes;
  return {
    count: nodes.length,
    unregistered: nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
    red: nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
    node_errors: Object.keys(app.lastNodeErrors ?? {}),
    execution_error: app.lastExecutionError ?? null,
  };
}"""
DIALOGS = "() => [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText)"
SAVE_IMAGES_SHOWN = """() => app.graph.nodes.filter(n => n.type === 'SaveImage').map(n =>
  (n.imgs ?? []).filter(i => i.complete && i.naturalWidth > 0).map(i => new URL(i.src).searchParams.get('filename')))"""
# Every node's box in screen pixels (canvas coordinates through app.canvas.ds), and the canvas element's box.
NODE_BOXES = """() => {
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  const boxes = app.graph.nodes.map(n => {
    const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
    const [x2, y2] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    return {node: `${n.id} ${n.type}`, left: r.left + x, top: r.top + y, right: r.left + x2, bottom: r.top + y2};
  });
  return {boxes, canvas: {left: r.left, top: r.top, right: r.right, bottom: r.bottom}, scale: ds.scale};
}"""


@pytest.fixture(scope="module")
def browser():
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run scripts/setup.sh (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, comfy_server):
    first_start_done = comfy_server.get("/settings/Comfy.TutorialCompleted") is True
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.page_errors = []
    pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
    pg.goto(comfy_server.url)
    pg.wait_for_function("window.app && window.app.vueAppReady && window.app.graph && window.LiteGraph",
                         timeout=120_000)
    if not first_start_done:  # a user's first start opens the template browser (and records that it did)
        pg.wait_for_selector("[role=dialog]", timeout=30_000)
        pg.locator("[role=dialog] button:has(i.pi-times)").first.click()
        pg.wait_for_timeout(500)
    assert not pg.evaluate(DIALOGS), "a dialog stays open before any workflow is loaded"
    banner = pg.get_by_text("Introducing Nodes 2.0")  # over the top of the canvas, where the node toolbox opens
    try:
        banner.wait_for(timeout=10_000)
        banner.locator("xpath=../..").locator("button").last.click()
    except PlaywrightTimeout:  # not shown (dismissed before): nothing to close
        pass
    yield pg
    context.close()


def load(page, workflow: dict, name: str = "workflow") -> dict:
    """Loads a UI-format workflow as dropping the file does; returns the graph's state and the open dialogs."""
    page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }",
                  [copy.deepcopy(workflow), name])
    page.wait_for_timeout(1000)  # the missing-nodes / missing-models dialogs open right after loading
    return {**page.evaluate(GRAPH_STATE), "dialogs": page.evaluate(DIALOGS)}


def assert_loads_clean(state: dict, workflow: dict) -> None:
    assert state["count"] == len(workflow["nodes"])
    assert not state["unregistered"], f"node types missing in the frontend: {state['unregistered']}"
    assert not [d for d in state["dialogs"] if "missing" in d.lower()], state["dialogs"]
    assert not state["red"], f"nodes in red: {state['red']}"


def queue_from_the_page(page, server, timeout: float = 600) -> tuple[str, dict]:
    """Clicks Run (the queue button) and waits for the prompt's /history entry; returns (prompt id, entry)."""
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        page.get_by_test_id("queue-button").locator("button").first.click()
    response = answer.value
    body = response.json()
    assert response.status == 200 and not body.get("node_errors"), body
    prompt_id = body["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("status_str") == "error":
            raise AssertionError(f"the prompt failed: {entry['status']['messages']}")
        if entry and entry["status"].get("completed"):
            return prompt_id, entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout}s")


def wait_for_saved_image(page, server, entry: dict) -> list[str]:
    """The Save Image node shows every file this prompt wrote (one per image of the batch); returns their names."""
    paths = server.output_images(entry)
    assert paths and all(os.path.getsize(p) > 0 for p in paths), paths
    written = sorted(os.path.basename(p) for p in paths)
    page.wait_for_function("names => { const shown = (" + SAVE_IMAGES_SHOWN + ")().flat(); "
                           "return names.every(n => shown.includes(n)); }", arg=written, timeout=60_000)
    return written


def frame_graph(page) -> dict:
    """Fit the view to the graph as the canvas's "fit view" button does. The minimap (bottom right) is hidden by
    a style in this page only (its button would change the user's settings), so that it covers nothing. Returns the node boxes on screen."""
    page.add_style_tag(content=".minimap-main-container { display: none !important; }")
    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(800)
    return page.evaluate(NODE_BOXES)


def assert_every_node_on_screen(view: dict) -> None:
    c = view["canvas"]
    off = [b["node"] for b in view["boxes"]
           if b["left"] < c["left"] or b["top"] < c["top"] or b["right"] > c["right"] or b["bottom"] > c["bottom"]]
    assert not off, f"nodes outside the view: {off}"
    assert view["scale"] > 0.3, f"fitted at {view['scale']:.2f}: too small to read"


def test_a_missing_node_is_caught(page):
    """The checks below can fail: a node type that no pack provides is reported (dialog, LiteGraph, red)."""
    workflow = json.load(open(DEFAULT_WORKFLOW))
    workflow["nodes"][0]["type"] = "NoSuchNodeFromAnyPack"
    state = load(page, workflow)
    assert state["unregistered"] == ["NoSuchNodeFromAnyPack"]
    assert any("NoSuchNodeFromAnyPack" in d and "missing" in d.lower() for d in state["dialogs"]), state["dialogs"]
    assert state["red"], "the missing node is not drawn in red"
    with pytest.raises(AssertionError):
        assert_loads_clean(state, workflow)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_runs_from_the_frontend(page, comfy_server, tmp_path, path):
    workflow = json.load(open(path))
    assert_loads_clean(load(page, workflow, os.path.splitext(os.path.basename(path))[0]), workflow)
    prompt_id, entry = queue_from_the_page(page, comfy_server)
    shown = wait_for_saved_image(page, comfy_server, entry)
    state = page.evaluate(GRAPH_STATE)
    assert not state["red"] and not state["node_errors"] and state["execution_error"] is None, state
    assert not page.page_errors, page.page_errors
    assert_every_node_on_screen(frame_graph(page))
    shot = str(tmp_path / (os.path.splitext(os.path.basename(path))[0] + ".png"))
    page.screenshot(path=shot)
    print(f"\n{os.path.basename(path)}: prompt {prompt_id}, Save Image shows {shown}; screenshot {shot}")
    if path == DEFAULT_WORKFLOW and os.environ.get("UPDATE_DOCS_IMAGES") == "1":
        shutil.copy(shot, DOCS_IMAGE)
        print(f"updated {DOCS_IMAGE}")


def plain(markdown: str) -> str:
    return re.sub(r"[*_`]", "", markdown)


def test_help_page_opens_from_the_node(page, comfy_server, tmp_path):
    """Select LLM Loader, click the selection toolbox's info button: the side panel shows web/docs/LLMLoader.md
    (the frontend asks /extensions/<pack folder>/docs/LLMLoader/<locale>.md, then .../docs/LLMLoader.md)."""
    doc = open(os.path.join(ROOT, "web", "docs", "LLMLoader.md"), encoding="utf-8").read()
    first_sentence = plain(doc.split("\n\n")[0]).split(". ")[0]
    workflow = json.load(open(DEFAULT_WORKFLOW))
    assert_loads_clean(load(page, workflow), workflow)
    loader = next(n["id"] for n in workflow["nodes"] if n["type"] == "LLMLoader")
    frame_graph(page)  # the toolbox opens above the node: away from the workflow tabs at the top
    page.evaluate("id => { app.canvas.selectNode(app.graph.getNodeById(id)); app.canvas.setDirty(true, true); }",
                  loader)
    with page.expect_response(lambda r: r.url.endswith("/docs/LLMLoader.md")) as answer:
        page.get_by_test_id("info-button").first.click()
    assert answer.value.status == 200, (f"{answer.value.url} answered {answer.value.status}: the pack's web "
                                        "folder is not registered (WEB_DIRECTORY in __init__.py)")
    panel = page.get_by_text(first_sentence)
    panel.wait_for(timeout=30_000)
    assert panel.is_visible()
    assert "is read as it is, with nothing converted or written" in page.inner_text("body")
    shot = str(tmp_path / "help-LLMLoader.png")
    page.screenshot(path=shot)
    print(f"\nhelp page screenshot {shot}")
