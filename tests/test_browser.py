"""The attention-map viewer in a real JupyterLab, driven by headless Chromium (marker ``browser``).

JupyterLab is started from the project's own environment on 127.0.0.1 with a random token;
notebook 04 (notebooks/04_attention_maps.ipynb, whose last cell hosts the viewer) is prepared by
papermill with its smallest parameters into results/browser/work/, opened and run; the layer
slider is moved and the method switched, and each must change the rendered image without any
error output. Screenshots go to results/browser/; with KVP_UPDATE_FIGURES=1 the last one is
also copied to figures/viewer.png.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import papermill
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
OUT = ROOT / "results" / "browser"
NOTEBOOK = ROOT / "notebooks" / "04_attention_maps.ipynb"
# The smallest run of notebook 04: one sample for Figures 2 and 5, two in the viewer.
SMOKE_PARAMS = {"N_SAMPLES": 1, "VIEWER_SAMPLES": 2, "ADAPTER": "untrained"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWER = ".kvp-attention-viewer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server rooted at the repository: yields (base url, token)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; `make setup` installs Debian's chromium package")
    token, port = secrets.token_hex(16), free_port()
    jupyter = Path(sys.executable).parent / "jupyter"
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    OUT.mkdir(parents=True, exist_ok=True)
    # A fresh workspace: JupyterLab would otherwise reopen the tabs of an earlier session.
    workspaces = tempfile.mkdtemp(prefix="kvp-lab-workspaces-")
    log = open(OUT / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
         "--allow-root", f"--LabApp.workspaces_dir={workspaces}",
         "--ServerApp.port_retries=0", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; see {OUT / 'jupyterlab.log'}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(workspaces, ignore_errors=True)


@pytest.fixture(scope="module")
def page(lab):
    from playwright import sync_api

    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1100})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def image_src(page) -> str:
    return page.locator(f"{VIEWER} img").first.get_attribute("src") or ""


def wait_for_new_image(page, old: str, timeout_s: float = 240) -> str:
    """Wait until the viewer's image differs from ``old`` and the redraw is reported."""
    page.wait_for_function(
        """([sel, old]) => { const img = document.querySelector(sel + ' img');
             const st = document.querySelector(sel + ' .kvp-status');
             return img && img.src && img.src !== old && st !== null; }""",
        arg=[VIEWER, old], timeout=timeout_s * 1000)
    return image_src(page)


def assert_no_errors(page) -> None:
    assert page.locator(f"{VIEWER} .kvp-error").count() == 0, page.inner_text(VIEWER)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    texts = [errors.nth(i).inner_text() for i in range(errors.count())]
    assert not [t for t in texts if "Error" in t or "Traceback" in t], texts


def accept_kernel_dialog(page) -> None:
    """JupyterLab may ask which kernel to start for the notebook: take the proposed one."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    if dialog.count():
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click()


def run_all_cells(page, tries: int = 5) -> None:
    """Run > Run All Cells, again if a kernel dialog swallowed the click or a busy machine kept the
    menu from answering in time, until a cell is queued."""
    from playwright.sync_api import TimeoutError as ClickTimeout

    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    for _ in range(tries):
        accept_kernel_dialog(page)
        try:
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=90_000)
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click(timeout=30_000)
        except ClickTimeout:
            page.keyboard.press("Escape")  # close a menu left half open, then try again
            continue
        for _ in range(20):
            if any(c in t for t in prompts.all_inner_texts() for c in "*0123456789"):
                return
            page.wait_for_timeout(500)
    raise AssertionError("JupyterLab did not start running the notebook's cells")


def cells_lost(page) -> bool:
    """True when no cell runs or waits although some code cell was never executed."""
    texts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    return not any("*" in t for t in texts) and any(t.strip() in ("[ ]:", "[ ]") for t in texts)


def shot(page, name: str) -> Path:
    path = OUT / name
    page.locator(VIEWER).screenshot(path=str(path))
    return path


def test_viewer_in_jupyterlab(lab, page):
    try:
        drive_viewer(lab, page)
    except Exception:
        page.screenshot(path=str(OUT / "failure.png"), full_page=True)
        raise


def drive_viewer(lab, page) -> None:
    base, token = lab
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOK), str(work / NOTEBOOK.name), prepare_only=True,
                               parameters={**SMOKE_PARAMS, "OUT_DIR": str(work / "out"),
                                           "FIG_DIR": str(work / "figures")})
    rel = (work / NOTEBOOK.name).relative_to(ROOT).as_posix()
    page.goto(f"{base}/lab/tree/{rel}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    # JupyterLab's "get notified about news?" toast would cover the viewer in the screenshots.
    page.add_style_tag(content=".Toastify { display: none !important; }")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)

    run_all_cells(page)
    deadline = time.monotonic() + 600
    while page.locator(f"{VIEWER} img").count() == 0:
        assert time.monotonic() < deadline, "the viewer did not appear within 600 s"
        accept_kernel_dialog(page)
        if cells_lost(page):  # a kernel switch dropped the queued cells: run them again
            run_all_cells(page)
        page.wait_for_timeout(1000)
    first = wait_for_new_image(page, "")
    assert_no_errors(page)
    shot(page, "01_initial.png")

    handle = page.locator(f"{VIEWER} .widget-slider", has_text="layer").locator(".noUi-handle")
    handle.first.focus()
    handle.first.press("ArrowRight")
    second = wait_for_new_image(page, first, timeout_s=60)
    assert "layer 16" in page.inner_text(VIEWER) or second != first
    assert_no_errors(page)
    shot(page, "02_layer.png")

    select = page.locator(f"{VIEWER} .widget-dropdown", has_text="method").locator("select")
    select.first.select_option(label="No Recompute")
    third = wait_for_new_image(page, second)
    assert_no_errors(page)
    final = shot(page, "03_method.png")

    assert len({first, second, third}) == 3
    pngs = [(OUT / n).read_bytes() for n in ("01_initial.png", "02_layer.png", "03_method.png")]
    assert len(set(pngs)) == 3, "the screenshots did not change"
    if os.environ.get("KVP_UPDATE_FIGURES") == "1":
        (ROOT / "figures").mkdir(exist_ok=True)
        shutil.copy(final, ROOT / "figures" / "viewer.png")
