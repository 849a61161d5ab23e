"""A real headless ComfyUI server with this pack loaded, for tests, the demo and benchmarks.

Installed by .ci/setup into .comfy_host/ (see ../shared/specs/comfy_host.md). The server gets its
own base directory (models, custom_nodes, input, output) and an in-memory database, listens on a
free loopback port, and is spoken to only over HTTP — the pack module the server imports is not
the one a test could import.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = REPO / ".comfy_host" / "comfyui"
PYTHON = REPO / ".venv" / "bin" / "python"
PACK_DIR_NAME = "dit-control"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with `with ComfyServer(models_dir) as server:`; `server.run(graph)` returns the history."""

    def __init__(self, models_dir: Path, base_dir: Path | None = None, extra_args=(), log_path: Path | None = None):
        if not (COMFY_DIR / "main.py").exists():
            raise RuntimeError(f"no ComfyUI host at {COMFY_DIR}: run `bash .ci/setup` first")
        self.models_dir = Path(models_dir)
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="comfy_base_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path or self.base_dir / "server.log")
        self.proc = None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        # our models folder (tiny checkpoints made by tests/make_checkpoints.py) as an extra search path
        cfg = self.base_dir / "extra_model_paths.yaml"
        cfg.write_text("dit_control_tests:\n"
                       f"    base_path: {self.models_dir}\n"
                       "    diffusion_models: diffusion_models\n"
                       "    text_encoders: text_encoders\n"
                       "    vae: vae\n"
                       "    controlnet: controlnet\n"
                       "    annotators: annotators\n"
                       "    checkpoints: checkpoints\n")
        cmd = [str(PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", "--disable-metadata", "--disable-api-nodes",
               "--extra-model-paths-config", str(cfg), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- HTTP -------------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def submit(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None \
                    and history[prompt_id]["status"].get("status_str") in ("success", "error"):
                return history[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 900.0) -> dict:
        """Submit a graph and wait; the history entry (status, outputs, messages)."""
        return self.wait(self.submit(graph), timeout)

    def images(self, history: dict) -> list[bytes]:
        """PNG bytes of every image an output node saved, in node order."""
        out = []
        for node_id in sorted(history.get("outputs", {}), key=str):
            for img in history["outputs"][node_id].get("images", []):
                query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                                "type": img["type"]})
                out.append(self.get(f"/view?{query}"))
        return out


class PromptRejected(RuntimeError):
    def __init__(self, status, body):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


def execution_error(history: dict) -> dict | None:
    """The execution_error message of a failed prompt, or None."""
    for kind, data in history.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def load_api_graph(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def default_models_dir() -> Path:
    return REPO / ".comfy_host" / "models"


def copy_tree(src: Path, dst: Path):
    shutil.copytree(src, dst, dirs_exist_ok=True)
