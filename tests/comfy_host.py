"""A real headless ComfyUI server with this pack loaded, for tests, the demo and benchmarks.

Installed by .ci/setup into .comfy_host/ (see ../shared/specs/comfy_host.md). The server gets its
own base directory (models, custom_nodes, input, output) and an in-memory database, listens on a
free loopback port, and is spoken to only over HTTP — the pack module the server imports is not
the one a test could import.

Which ComfyUI: the environment variable DIT_CONTROL_COMFY_HOST (default `0.33`, the release users
run; `0.3.75`, the floor). The test suite also runs its compatibility pass on the floor (conftest).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
PACK_DIR_NAME = "dit-control"
HOST_ENV = "DIT_CONTROL_COMFY_HOST"
# host name -> install folder under .comfy_host/ (made by .ci/setup)
HOSTS = {"0.33": "v0.33.0", "0.3.75": "v0.3.75"}
DEFAULT_HOST = "0.33"
FLOOR_HOST = "0.3.75"
# a test-only custom node pack that reads the running host's internals (tests/host_probe/)
PROBE_PACK = REPO / "tests" / "host_probe"


def host_name() -> str:
    """The host chosen by DIT_CONTROL_COMFY_HOST."""
    name = os.environ.get(HOST_ENV, DEFAULT_HOST)
    if name not in HOSTS:
        raise RuntimeError(f"{HOST_ENV}={name!r}: expected one of {sorted(HOSTS)}")
    return name


def comfy_dir(host: str | None = None) -> Path:
    """The ComfyUI tree of a host."""
    return REPO / ".comfy_host" / HOSTS[host or host_name()] / "comfyui"


def host_site_overlay(host: str) -> Path:
    """Packages this host pins to other versions than the venv has (0.3.75's frontend), or a missing path."""
    return REPO / ".comfy_host" / HOSTS[host] / "site"


COMFY_DIR = comfy_dir()   # the chosen host's tree (its tokenizer files serve the kernel references)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with `with ComfyServer(models_dir) as server:`; `server.run(graph)` returns the history."""

    def __init__(self, models_dir: Path, base_dir: Path | None = None, extra_args=(), log_path: Path | None = None,
                 host: str | None = None, probe: bool = False, cpu: bool = True):
        self.host = host or host_name()
        self.cpu = cpu            # False: the host picks its device (the GPU check on a CUDA machine)
        self.comfy_dir = comfy_dir(self.host)
        if not (self.comfy_dir / "main.py").exists():
            raise RuntimeError(f"no ComfyUI {self.host} host at {self.comfy_dir}: run `bash .ci/setup` first")
        self.probe = probe
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
        probe_link = custom / PROBE_PACK.name
        if self.probe and not probe_link.exists():
            probe_link.symlink_to(PROBE_PACK, target_is_directory=True)
        # our models folder (tiny checkpoints made by tests/generators/make_checkpoints.py) as an extra search path
        cfg = self.base_dir / "extra_model_paths.yaml"
        cfg.write_text("dit_control_tests:\n"
                       f"    base_path: {self.models_dir}\n"
                       "    diffusion_models: diffusion_models\n"
                       "    text_encoders: text_encoders\n"
                       "    vae: vae\n"
                       "    controlnet: controlnet\n"
                       "    annotators: annotators\n"
                       "    loras: loras\n"
                       "    checkpoints: checkpoints\n"
                       "    controlar: controlar\n")
        cmd = [str(PYTHON), "main.py", *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", "--disable-metadata", "--disable-api-nodes",
               "--extra-model-paths-config", str(cfg), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        overlay = host_site_overlay(self.host)
        if overlay.is_dir():   # in front of the venv's site-packages for this server only
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(overlay), env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
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

    def run_ok(self, graph: dict, timeout: float = 900.0) -> dict:
        """`run`, asserting that the prompt succeeded (else its error and the server log's tail)."""
        history = self.run(graph, timeout)
        err = execution_error(history)
        assert err is None and history["status"]["status_str"] == "success", \
            f"{err and err.get('exception_message')}\n{self.log_tail(40)}"
        return history

    def saved_latent(self, history: dict, node: str = "90"):
        """The latent a SaveLatent node of a successful prompt wrote (its `latent_tensor`)."""
        from safetensors.torch import load_file
        assert history["status"]["status_str"] == "success", execution_error(history)
        entry = history["outputs"][node]["latents"][0]
        return load_file(str(self.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]

    def images(self, history: dict) -> list[bytes]:
        """PNG bytes of every image an output node saved, in node order."""
        out = []
        for node_id in sorted(history.get("outputs", {}), key=str):
            for img in history["outputs"][node_id].get("images", []):
                query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                                "type": img["type"]})
                out.append(self.get(f"/view?{query}"))
        return out

    def sampler_noise(self, width: int, height: int, seed: int, draws: int):
        """(initial noise, [step noise, ...]) that this host's samplers draw for a 4-channel latent of an
        image of this size and this seed, read through the probe pack: the references of our exactness
        tests come from the running host, not from a copy of its rule (v0.33 seeds step noise with
        seed + 1 on the CPU, 0.3.75 with seed)."""
        if not self.probe:
            raise RuntimeError("sampler_noise needs a server started with probe=True")
        key = (width, height, seed, draws)
        cache = self.__dict__.setdefault("_noise_cache", {})
        if key not in cache:
            from safetensors.torch import load_file
            graph = {
                "1": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
                "2": {"class_type": "DiTControlProbe_SamplerNoise",
                      "inputs": {"samples": ["1", 0], "seed": seed, "draws": draws}},
                "3": {"class_type": "SaveLatent",
                      "inputs": {"samples": ["2", 0], "filename_prefix": f"probe/noise_{seed}"}},
            }
            history = self.run(graph)
            if history.get("status", {}).get("status_str") != "success":
                raise RuntimeError(f"probe failed: {execution_error(history)}")
            entry = history["outputs"]["3"]["latents"][0]
            drawn = load_file(str(self.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]
            cache[key] = (drawn[:1], [drawn[i + 1:i + 2] for i in range(draws)])
        initial, steps = cache[key]
        return initial.clone(), [s.clone() for s in steps]


class PromptRejected(RuntimeError):
    def __init__(self, status, body):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


def assert_documented(object_info: dict, name: str, category: str):
    """A pack node as users see it in the UI: its category, a real description, a tooltip on every input."""
    info = object_info[name]
    assert info["category"] == category, (name, info["category"])
    assert len(info["description"]) > 40, name
    for section in ("required", "optional"):
        for input_name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


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
