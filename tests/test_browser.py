"""Real-browser test of the KV-cache widgets (chapter `05a_cache_widgets`).

Starts JupyterLab on 127.0.0.1 (free port, random token, a temp copy of the chapter), drives Debian's chromium
with playwright (no browser download), runs all cells, clicks the player's Step button and checks that the block
grid changed. Keeps a screenshot of the player as the artifact `ci_artifacts/viz_step.png`.
Skipped only when /usr/bin/chromium is absent (CI installs it when `.ci/browser-deps` exists).
"""
import json, os, shutil, signal, socket, subprocess, sys, time, secrets, urllib.request
from pathlib import Path
import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
NB = "05a_cache_widgets.ipynb"
ARTIFACT = REPO / "ci_artifacts" / "viz_step.png"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Debian chromium not installed at {CHROMIUM} (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read()


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving a temp copy of the chapter; yields (base_url, token)."
    root = tmp_path / "nbs"; root.mkdir()
    shutil.copy(REPO / "nbs" / NB, root / NB)
    # Lab settings in a temp dir: no news/update checks (no network), no notebook windowing (all cells in the DOM).
    settings = tmp_path / "lab-settings"
    lab_settings = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}
    for plugin, value in lab_settings.items():
        f = settings / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--allow-root", "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
           "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            try:
                if _get(f"{base}/api/status?token={token}")[0] == 200: break
            except OSError: pass
            if time.time() > deadline: pytest.fail("jupyter lab did not start in 30 s")
            time.sleep(0.3)
        yield base, token
    finally:
        try:  # graceful: the server shuts its kernels down too
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5)
            proc.wait(timeout=10)
        except Exception: pass
        if proc.poll() is None:  # only our own process group (server + its kernels)
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(timeout=5)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


# idle, and no cell waiting or running ("[*]"): the idle status alone flickers between two queued cells
ALL_RUN = """() => (""" + KERNEL_IDLE + """)() && ![...document.querySelectorAll('.jp-InputArea-prompt')]
  .some(p => p.textContent.includes('*'))"""


# error outputs of every code cell, read from the notebook model
ERRORS = """() => {
  const m = window.jupyterapp.shell.currentWidget.content.model, errs = [];
  for (let i = 0; i < m.cells.length; i++) {
    const c = m.cells.get(i);
    if (c.type !== 'code') continue;
    for (const o of c.outputs.toJSON()) if (o.output_type === 'error') errs.push(o.ename + ': ' + o.evalue);
  }
  return errs;
}"""

NOT_RUN = """() => {
  const m = window.jupyterapp.shell.currentWidget.content.model;
  let n = 0;
  for (let i = 0; i < m.cells.length; i++) { const c = m.cells.get(i); if (c.type === 'code' && !c.executionCount) n++; }
  return n;
}"""


def test_step_changes_block_grid(lab):
    from playwright.sync_api import sync_playwright
    base, token = lab
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NB}?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=45_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # the player's cell ran, or some cell failed first (then fail now, not after a timeout)
            page.wait_for_function("() => !!document.querySelector('.nvl-player') || (" + ERRORS + ")().length > 0",
                                   timeout=60_000)
            errors = page.evaluate(ERRORS)
            assert not errors, "cells raised: " + "; ".join(errors)[:2000]
            player = page.locator(".nvl-player").first
            player.wait_for(state="visible", timeout=10_000)
            grid = player.locator(".nvl-grid")
            grid.wait_for(state="attached", timeout=10_000)
            before = grid.inner_html()
            assert before.count("nvl-block") > 0
            header_before = player.locator(".nvl-header").inner_text()
            player.get_by_role("button", name="Step", exact=True).click()
            # the click round-trips through the kernel, which may still be running later cells
            page.wait_for_function("([sel, old]) => { const g = document.querySelector(sel); "
                                   "return g && g.innerHTML !== old; }", arg=[".nvl-player .nvl-grid", before],
                                   timeout=45_000)
            after = grid.inner_html()
            assert after != before
            assert player.locator(".nvl-header").inner_text() != header_before
            ARTIFACT.parent.mkdir(exist_ok=True)
            player.scroll_into_view_if_needed()
            player.screenshot(path=str(ARTIFACT))
            # every cell ran without an error output
            page.wait_for_function(ALL_RUN, timeout=max(1_000, int((80 - (time.time() - t0)) * 1000)))
            errors = page.evaluate(ERRORS)
            assert not errors, "cells raised: " + "; ".join(errors)[:2000]
            assert page.evaluate(NOT_RUN) == 0, "some code cells did not run"
        finally:
            browser.close()
    assert ARTIFACT.stat().st_size > 1000
