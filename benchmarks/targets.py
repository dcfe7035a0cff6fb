"""What is measured: the upstream directly, llmgateway (``llmgateway serve`` with a generated
gateway.toml), and LiteLLM's proxy (installed on demand into ``benchmarks/.venv-litellm``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from . import procs
from .scenarios import ALIAS, MASTER_KEY, UPSTREAM_KEY, UPSTREAM_MODEL, Chain, Env, write_config

HERE = Path(__file__).resolve().parent
LITELLM_VENV = HERE / ".venv-litellm"
LITELLM_REQUIREMENTS = HERE / "litellm-requirements.txt"
LITELLM_NODEPS = HERE / "litellm-nodeps.txt"

MESSAGES = [{"role": "user", "content": "Say something short about foxes."}]


@dataclass
class Target:
    name: str  # row label in the report
    kind: str  # direct | llmgateway | litellm
    base_url: str = ""
    model: str = ALIAS
    api_key: str | None = MASTER_KEY
    workers: int = 1
    server: str = ""
    chain: str = ""
    child: procs.Child | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def body(self, stream: bool, model: str | None = None) -> bytes:
        payload: dict[str, object] = {"model": model or self.model, "messages": MESSAGES, "max_tokens": 32}
        if stream:
            payload["stream"] = True
        return orjson.dumps(payload)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


def direct(upstream_url: str) -> Target:
    return Target("upstream (direct)", "direct", base_url=upstream_url, model=UPSTREAM_MODEL, api_key=UPSTREAM_KEY)


def _probe(target: Target, timeout: float) -> None:
    """Wait until a real chat request answers 200 (plugins may start slowly)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if target.child is not None and target.child.proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited:\n{target.child.log.read_text(errors='replace')[-3000:]}")
        request = urllib.request.Request(target.url, data=target.body(False), headers=target.headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"{exc.code}: {exc.read()[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{target.name} did not answer 200 within {timeout:.0f} s (last: {last})")


def start_llmgateway(
    name: str, upstream_url: str, workdir: Path, chain: Chain, *, workers: int = 1, server: str = "hypercorn"
) -> Target:
    port = procs.free_port()
    env = Env(upstream_url=upstream_url, workdir=workdir, port=port, workers=workers, server=server)
    config = write_config(env, chain, workdir / f"gateway-{server}-{workers}w.toml")
    cli = str(Path(sys.executable).with_name("llmgateway"))
    argv = [cli, "serve", "--config", str(config), "--port", str(port), "--workers", str(workers), "--server", server]
    # cwd: files a plugin writes by default (SQLite database, spool) land in the work dir
    child = procs.start(name, argv, workdir / f"llmgateway-{server}-{workers}w.log", cwd=str(workdir))
    target = Target(
        name,
        "llmgateway",
        base_url=f"http://127.0.0.1:{port}",
        api_key=env.api_key,
        workers=workers,
        server=server,
        chain=chain.label(),
        child=child,
        info={"config": str(config), "argv": argv},
    )
    try:
        procs.wait_port(port, 60, child.proc, child.log)
        _probe(target, 60)
    except BaseException:
        target.stop()
        raise
    return target


def litellm_python() -> Path:
    return LITELLM_VENV / "bin" / "python"


def litellm_version() -> str | None:
    python = litellm_python()
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def ensure_litellm(log: Path) -> str:
    """Create ``benchmarks/.venv-litellm`` and install the pinned LiteLLM proxy from PyPI if needed."""
    version = litellm_version()
    if version and (LITELLM_VENV / "bin" / "litellm").exists():
        return version
    print(f"installing LiteLLM's proxy into {LITELLM_VENV} (once; log: {log}) ...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    with log.open("ab") as out:
        if not litellm_python().exists():
            subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True, stdout=out, stderr=out)
        pip = [str(litellm_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(LITELLM_REQUIREMENTS)], check=True, stdout=out, stderr=out, timeout=1800)
        subprocess.run([*pip, "--no-deps", "-r", str(LITELLM_NODEPS)], check=True, stdout=out, stderr=out, timeout=600)
    version = litellm_version()
    if not version:
        raise RuntimeError(f"LiteLLM did not install; see {log}")
    return version


def litellm_config(upstream_url: str) -> str:
    return f"""# generated by `python -m benchmarks run`: one model on the canned upstream, no database, no logging
model_list:
  - model_name: {ALIAS}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: {upstream_url}/v1
      api_key: {UPSTREAM_KEY}
litellm_settings:
  set_verbose: false
  json_logs: false
  turn_off_message_logging: true
  telemetry: false
  request_timeout: 600
general_settings:
  master_key: {MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
  allow_requests_on_db_unavailable: true
"""


def start_litellm(upstream_url: str, workdir: Path) -> Target:
    version = ensure_litellm(workdir / "litellm-install.log")
    port = procs.free_port()
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(upstream_url))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "LITELLM_"))}
    env.update(
        {
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # never fetch the price list from the network
            "LITELLM_TELEMETRY": "False",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            "PYTHONUNBUFFERED": "1",
        }
    )
    argv = [
        str(LITELLM_VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    child = procs.start("litellm", argv, workdir / "litellm.log", env=env, cwd=str(workdir))
    target = Target(
        f"LiteLLM {version}",
        "litellm",
        base_url=f"http://127.0.0.1:{port}",
        workers=1,
        server="uvicorn (LiteLLM's default)",
        chain="master key, no database, logging off",
        child=child,
        info={"config": str(config), "argv": argv, "version": version},
    )
    try:
        procs.wait_port(port, 180, child.proc, child.log)
        _probe(target, 120)
    except BaseException:
        target.stop()
        raise
    return target
