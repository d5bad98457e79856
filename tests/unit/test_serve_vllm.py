"""The vLLM engine: its command line, environment and registry-derived flags, and the process
lifecycle, against a fake `vllm` executable (fast, and able to crash or hang on request; the real
vLLM is in tests/integration/test_serve_vllm_real.py).

The fake is a stand-in for the binary only: it records the argv and environment it was started
with, serves /health on the --host/--port it was given, and can crash or hang on request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.training import build_tiny_model
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.serving.settings import RegistryServing, resolve_serve_config
from tunepipe.tasks.serving.process import free_port, is_healthy
from tunepipe.tasks.serving.vllm import VLLMError, VLLMServer, explain, vllm_command, vllm_env
from tunepipe.tasks.serving.vllm_env import env_python

FAKE_VLLM = """\
#!{python}
import http.server, json, os, signal, sys, time
args = sys.argv[1:]
keep = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_API_KEY")
with open(os.environ["FAKE_VLLM_RECORD"], "w") as fh:
    json.dump({{"argv": args, "env": {{k: os.environ.get(k) for k in keep}}, "pid": os.getpid()}}, fh)
mode = os.environ.get("FAKE_VLLM_MODE", "serve")
if mode == "crash":
    print("RuntimeError: No CUDA GPUs are available", flush=True)
    sys.exit(3)
if mode == "hang":  # never healthy, ignores SIGTERM: only SIGKILL ends it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
time.sleep(0.5)  # a real server takes a while: the launcher must wait, not assume
print("INFO: Application startup complete.", flush=True)
http.server.HTTPServer((host, port), Health).serve_forever()
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> dict:
    exe = tmp_path / "vllm-env" / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE_VLLM.format(python=sys.executable))
    exe.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return {"exe": str(exe), "record": record}


def write_adapter(path: Path, r: int) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "target_modules": ["q_proj"]}))
    return str(path)


def write_base(path: Path, quant_method: str | None = None) -> str:
    path.mkdir(parents=True)
    config = {"model_type": "llama"}
    if quant_method:
        config["quantization_config"] = {"quant_method": quant_method, "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_command_and_environment_carry_the_registry_derived_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_TEST_VLLM_KEY", "k")
    base = write_base(tmp_path / "base-bnb4", "bitsandbytes")
    served = RegistryServing(base=base, adapters={"notes": write_adapter(tmp_path / "reg" / "notes", 12),
                                                  "triage": write_adapter(tmp_path / "reg" / "triage", 4)},
                             max_rank=12, quantization="bitsandbytes", root=str(tmp_path / "reg"))
    profile = load_environment("serve-vllm")
    config = resolve_serve_config(ServeConfig(engine="vllm", port=8123, api_key="${TUNEPIPE_TEST_VLLM_KEY}", vllm={"extra_args": ["--enforce-eager"]}),
                                  profile, served)
    cmd = vllm_command(config)
    # the managed environment the profile names, through the server module (vLLM's CLI fails in the CPU build)
    assert cmd[:5] == [str(env_python("cuda")), "-m", "vllm.entrypoints.openai.api_server", "--model", base]

    def flag(name):
        return cmd[cmd.index(name) + 1]

    assert "--enable-lora" in cmd
    modules = cmd[cmd.index("--lora-modules") + 1: cmd.index("--max-loras")]
    assert modules == [f"notes={served.adapters['notes']}", f"triage={served.adapters['triage']}"]
    assert flag("--max-lora-rank") == "64"  # the profile's 64 holds rank 12
    assert flag("--max-loras") == str(profile.serving.max_loras)
    assert flag("--max-cpu-loras") == str(profile.serving.max_cpu_loras)
    assert flag("--quantization") == "bitsandbytes"  # from the registered base's config.json
    assert flag("--gpu-memory-utilization") == "0.9" and flag("--tensor-parallel-size") == "1"
    assert flag("--dtype") == "bfloat16" and flag("--port") == "8123" and flag("--host") == "127.0.0.1"
    assert cmd[-1] == "--enforce-eager"
    assert "k" not in cmd and "--api-key" not in cmd  # the key is not visible in `ps`
    env = vllm_env("k", base={"PATH": "/bin", "VLLM_API_KEY": "stale"})
    assert env == {"PATH": "/bin", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": "k"}
    assert "VLLM_API_KEY" not in vllm_env(None, base={"VLLM_API_KEY": "stale"})


def test_cpu_profile_sets_the_kv_cache_context_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))
    config = resolve_serve_config(ServeConfig(engine="vllm", base=write_base(tmp_path / "b")), load_environment("serve-vllm-cpu"))
    cmd = vllm_command(config)
    assert cmd[0] == str(tmp_path / "cache" / "vllm" / "cpu-0.32.0" / "bin" / "python")
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--max-model-len") + 1] == "512"
    assert VLLMServer(config, log_file=tmp_path / "log").env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(VLLMError, match=r"vLLM's environment is missing: .*tunepipe vllm-env cpu"):
        VLLMServer(config, log_file=tmp_path / "log").start()  # not built in this cache: says how to build it
    assert "rebuild the environment" in explain("... operator torchvision::nms does not exist")
    assert "raise --max-lora-rank" in explain("ValueError: LoRA rank 32 is greater than max_lora_rank 16")
    assert "DoRA" in explain("config: max_lora_rank=16 ...\nValueError: vLLM does not yet support DoRA.")  # not the config dump


def test_rank_is_raised_to_a_value_vllm_accepts_and_max_loras_to_the_adapter_count(tmp_path):
    adapters = {f"a{i}": write_adapter(tmp_path / f"a{i}", 100 if i == 0 else 8) for i in range(10)}
    config = resolve_serve_config(ServeConfig(engine="vllm", base=write_base(tmp_path / "b"), lora_modules=adapters),
                                  load_environment("serve-vllm"))
    cmd = vllm_command(config)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "128"  # 100 → vLLM's next allowed rank
    assert cmd[cmd.index("--max-loras") + 1] == "10"  # all ten can share a batch
    assert "--quantization" not in cmd  # a full-precision base


def test_container_image_mounts_the_model_dirs_and_passes_the_key_by_name(tmp_path):
    base = write_base(tmp_path / "base")
    adapter = write_adapter(tmp_path / "reg" / "notes", 8)
    config = resolve_serve_config(
        ServeConfig(engine="vllm", base=base, lora_modules={"notes": adapter}, port=9000, host="10.0.0.5",
                    allowed_adapter_dirs=[str(tmp_path / "reg")], vllm={"image": "vllm/vllm-openai:v0.33.0"}),
        load_environment("serve-vllm"),
    )
    cmd = vllm_command(config)
    image_at = cmd.index("vllm/vllm-openai:v0.33.0")
    docker, serve = cmd[:image_at], cmd[image_at + 1:]
    assert docker[:3] == ["docker", "run", "--rm"] and "--gpus" in docker
    assert "10.0.0.5:9000:9000" in docker and "VLLM_API_KEY" in docker  # the value comes from the environment
    assert f"{base}:{base}:ro" in docker and f"{tmp_path / 'reg'}:{tmp_path / 'reg'}:ro" in docker
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in docker
    assert serve[0] == base and serve[serve.index("--host") + 1] == "0.0.0.0"  # the image's entrypoint is `vllm serve`


def test_lifecycle_waits_for_health_and_stops_the_process(tmp_path, fake_vllm):
    port = free_port()
    config = resolve_serve_config(
        ServeConfig(engine="vllm", base=write_base(tmp_path / "b"), port=port, vllm={"executable": fake_vllm["exe"]}),
        load_environment("serve-vllm"),
    )
    server = VLLMServer(config, api_key="secret", log_file=tmp_path / "vllm.log")
    with server:
        assert is_healthy(f"{server.url}/health")  # start() returned only once healthy
        record = json.loads(fake_vllm["record"].read_text())
        assert record["argv"][0] == "serve" and "--enable-lora" in record["argv"]
        assert record["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": "secret"}
        pid = record["pid"]
        assert server.alive()
    assert not server.alive() and server.process.returncode == 0
    assert not is_healthy(f"{server.url}/health")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "Application startup complete" in (tmp_path / "vllm.log").read_text()


def test_a_crashing_vllm_fails_start_with_its_log(tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    config = resolve_serve_config(
        ServeConfig(engine="vllm", base=write_base(tmp_path / "b"), port=free_port(), vllm={"executable": fake_vllm["exe"]}),
        load_environment("serve-vllm"),
    )
    with pytest.raises(VLLMError, match=r"(?s)exited before.*No CUDA GPUs are available"):
        VLLMServer(config, log_file=tmp_path / "vllm.log").start()


def test_a_hanging_vllm_times_out_and_is_killed(tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    config = resolve_serve_config(
        ServeConfig(engine="vllm", base=write_base(tmp_path / "b"), port=free_port(),
                    vllm={"executable": fake_vllm["exe"], "health_timeout_s": 1.5, "stop_timeout_s": 0.5}),
        load_environment("serve-vllm"),
    )
    server = VLLMServer(config, log_file=tmp_path / "vllm.log")
    started = time.monotonic()
    with pytest.raises(VLLMError, match="did not answer within 2s"):
        server.start()
    assert time.monotonic() - started < 10
    assert server.process.returncode == -signal.SIGKILL  # SIGTERM was ignored: escalated


def test_cli_starts_vllm_and_stops_it_on_sigterm(tmp_path, fake_vllm):
    """`tunepipe serve --engine vllm` end to end: the CLI process manages the fake vLLM's lifecycle."""
    port = free_port()
    base = str(build_tiny_model(tmp_path / "b"))  # the front loads the base's tokenizer to escape chat contents
    adapter = write_adapter(tmp_path / "adapters" / "notes", 8)
    cli = subprocess.Popen(
        [sys.executable, "-m", "tunepipe.flows.cli.main", "serve", base, "--engine", "vllm", "--vllm-executable", fake_vllm["exe"],
         "--port", str(port), "--lora-modules", f"notes={adapter}", "--workdir", str(tmp_path / "work"), "--env", "serve-vllm"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not is_healthy(f"http://127.0.0.1:{port}/health"):
            assert cli.poll() is None, cli.stdout.read()
            assert time.monotonic() < deadline, "the fake vLLM never became healthy"
            time.sleep(0.2)
        record = json.loads(fake_vllm["record"].read_text())
        assert record["argv"][:2] == ["serve", base]
        # behind the front: vLLM knows the adapter by its versioned name, on a private port
        assert any(arg.startswith("notes@") and arg.endswith(f"={adapter}") for arg in record["argv"])
        assert record["argv"][record["argv"].index("--port") + 1] != str(port)
        assert record["env"]["VLLM_API_KEY"]  # a private key only the front knows
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    output = cli.stdout.read()
    assert "starting vLLM" in output and "stopping vLLM" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)


def test_a_failed_environment_build_says_where_and_is_not_taken_for_ready(tmp_path, monkeypatch):
    """`tunepipe vllm-env` with a package pip cannot find (offline: --no-index): one error with pip's own words and
    the log, no marker, so the next run builds again; tests read that as the registry's refusal (a skip)."""
    from tunepipe.tasks.serving import vllm_env
    from tests.helpers.vllm import REGISTRY_REFUSAL

    monkeypatch.setitem(vllm_env.BUILDS, "cpu", vllm_env.VLLMBuild("cpu", "0.0.0", ("--no-index", "tunepipe-absent-package==0.0.0")))
    with pytest.raises(vllm_env.VLLMEnvError, match=r"(?s)failed at `pip install .*No matching distribution.*full log: ") as failure:
        vllm_env.build_env("cpu", root=tmp_path, say=lambda line: None)
    assert REGISTRY_REFUSAL.search(str(failure.value))
    assert not vllm_env.is_built("cpu", root=tmp_path) and not (tmp_path / "vllm" / "cpu-0.0.0" / vllm_env.MARKER).exists()
