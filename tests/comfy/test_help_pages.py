"""Help pages of the pack's nodes: web/docs/<node id>.md in the markdown style of comfyui-embedded-docs (a
description, then Inputs and Outputs tables), in step with the nodes' real inputs and outputs, and served over
HTTP where ComfyUI's frontend (comfyui-frontend-package 1.32.9) looks for a custom node's help:
/extensions/<custom_nodes folder>/docs/<node id>/<locale>.md, then /extensions/<folder>/docs/<node id>.md.
(test_browser.py opens one of them in the frontend itself.)"""
import os
import re
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

DOCS = os.path.join(ROOT, "web", "docs")
NODES = ("LLMLoader", "LLMAdapterLoader", "LLMPromptEncode", "LIDiTLoader", "LIDiTSampler", "LLMConditioningJoin")
PAGES = sorted({f[:-3] for f in os.listdir(DOCS) if f.endswith(".md")} | set(NODES))
FRONTEND_ONLY = {"control_after_generate"}  # the seed's frontend option, listed like ComfyUI's own pages do


def table_names(markdown: str, title: str) -> list[str]:
    """First column of the table under `## <title>`."""
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"no '## {title}' section"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and set(rows[1]) <= set("|- :"), f"no table under '## {title}'"
    return [row.strip("|").split("|")[0].strip() for row in rows[2:]]


def read(node: str) -> str:
    with open(os.path.join(DOCS, f"{node}.md"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("node", PAGES)
def test_help_page_lists_the_nodes_inputs_and_outputs(object_info, node):
    page = read(node)
    assert node in object_info, f"web/docs/{node}.md: no such node"
    info = object_info[node]
    declared = list(info["input"].get("required", {})) + list(info["input"].get("optional", {}))
    listed = table_names(page, "Inputs")
    assert [n for n in listed if n not in FRONTEND_ONLY] == declared, "Inputs table vs the node's inputs"
    assert table_names(page, "Outputs") == info["output_name"]
    description = page.split("\n## ")[0].strip()
    assert len(description) > 100 and not description.startswith("#"), "a description comes first (no title)"


def test_every_node_of_the_pack_has_a_help_page(object_info):
    pack = object_info["LLMLoader"]["python_module"]
    nodes = {name for name, info in object_info.items() if info["python_module"] == pack}
    assert set(NODES) <= nodes
    missing = sorted(n for n in nodes if not os.path.isfile(os.path.join(DOCS, f"{n}.md")))
    assert not missing, f"nodes without a help page web/docs/<node>.md: {missing}"


@pytest.mark.parametrize("node", PAGES)
def test_server_serves_the_help_page_where_the_frontend_looks(comfy_server, object_info, node):
    module = object_info[node]["python_module"]
    assert module.startswith("custom_nodes."), module
    folder = module.split(".", 1)[1].split("@")[0]  # the frontend's extractCustomNodeName / normalizePackId
    url = f"{comfy_server.url}/extensions/{folder}/docs/{node}.md"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            served = r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url} answered {e.code}: the pack's web folder is not registered "
                             "(WEB_DIRECTORY = \"./web\" in the pack's __init__.py)") from None
    assert served == read(node)
