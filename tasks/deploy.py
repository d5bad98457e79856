"""The `deploy` stage: registry version, serving alias, hot-load into the running server, smoke test.

Inputs: `export` (required: its `exports.json` names the adapters, base, data key and gate),
`evaluate` (optional: its metrics `gate_passed` / `gate_reasons`; without it the export's
recorded gate is used).

When the gate passed, for each exported adapter (one, or one per task: `<name>-<task>`):
register it (a new version, or the existing one for identical content), point the alias at it,
hot-load it into the server under its name (unload + `POST /v1/load_lora_adapter`, no restart),
and send one real chat request. When any of that fails, every alias this run moved goes back
(registry rollback, and the previous version is hot-loaded again), and the stage fails saying
what serves now. When the gate failed (or there is none and `require_gate`), nothing is
registered or promoted; the artifact records why.

The cache key, and why a rerun never promotes twice: the key hashes the config (name, registry,
alias, server URL, smoke test), the input keys (export, evaluate) and the code, never time or
run ids. The artifact is the record of the deployment decision for exactly those inputs: a rerun
with the same inputs returns it without touching the registry or the server, so it neither
re-promotes nor undoes an operator's later `tunepipe registry rollback`. A forced rerun
(`--from deploy`) is idempotent as well: identical content gets its existing version back, and
promoting the version an alias already points at changes nothing. A failed deployment publishes
no artifact, so the next run tries again.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.deploy import DeployConfig
from schemas.registry import Lineage
from tasks.adapter_registry import AdapterRegistry
from tasks.artifacts import read_manifest
from tasks.stage import Stage, StageContext, StageFailed, StageOutput


class DeployError(RuntimeError):
    """A hot-load or smoke test that failed; triggers the rollback."""


# --------------------------------------------------------------------------------------------
# The server, over HTTP


def load_payload(name: str, path: str) -> dict[str, str]:
    return {"lora_name": name, "lora_path": path}


class ServerClient:
    """The OpenAI-compatible server's adapter endpoints (vLLM's names) and one chat request."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        import httpx

        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def served(self) -> dict[str, str]:
        """{model id: root} of what the server serves now (adapters' root is their directory)."""
        import httpx

        try:
            response = self.http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise StageFailed(f"deploy: server {self.url} is not reachable ({exc.__class__.__name__}: {exc}); nothing was changed") from None
        if response.status_code != 200:
            raise StageFailed(f"deploy: server {self.url} answered GET /v1/models with {response.status_code}: {response.text[:300]}")
        return {card["id"]: card.get("root") for card in response.json().get("data", [])}

    def swap(self, name: str, path: str) -> None:
        """Serve the adapter at `path` under `name`: unload what has that name, then load (vLLM refuses a loaded name)."""
        self.unload(name)
        self._post("/v1/load_lora_adapter", load_payload(name, path))

    def unload(self, name: str) -> None:
        """Stop serving `name` (nothing to do when the server does not serve it)."""
        if name in self.served():
            self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def chat(self, model: str, prompt: str, max_tokens: int) -> str:
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=self.timeout)
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
            )
        except openai.OpenAIError as exc:
            raise DeployError(f"chat request to {model} failed: {exc}") from None
        return reply.choices[0].message.content or ""

    def _post(self, path: str, payload: dict[str, str]) -> None:
        import httpx

        try:
            response = self.http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise DeployError(f"POST {path} {payload}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code != 200:
            raise DeployError(f"POST {path} {payload} answered {response.status_code}: {response.text[:300]}")


def smoke_test(client: ServerClient, name: str, config: DeployConfig) -> dict[str, Any]:
    """One chat request; the answer must be non-empty, or match `expect_regex`."""
    started = time.perf_counter()
    answer = client.chat(name, config.smoke.prompt, config.smoke.max_tokens)
    seconds = round(time.perf_counter() - started, 3)
    if config.smoke.expect_regex is not None and not re.search(config.smoke.expect_regex, answer):
        raise DeployError(f"smoke test of {name}: answer {answer!r} does not match {config.smoke.expect_regex!r}")
    if not answer.strip():
        raise DeployError(f"smoke test of {name}: empty answer")
    return {"answer": answer, "seconds": seconds}


def api_key(config: DeployConfig) -> str | None:
    if config.api_key_env is None:
        return None
    value = os.environ.get(config.api_key_env)
    if not value:
        raise StageFailed(f"deploy: api_key_env {config.api_key_env} is not set in the environment")
    return value


# --------------------------------------------------------------------------------------------
# What to deploy, and whether


@dataclass(frozen=True)
class Candidate:
    name: str  # registry and served name
    run: str
    path: Path


def candidates(config: DeployConfig, export_dir: Path, exports: dict[str, Any]) -> list[Candidate]:
    adapters = exports["targets"].get("adapters")
    if not adapters:
        raise StageFailed(
            f"deploy: the export artifact {export_dir} has no `adapters` target (kind {exports['kind']}): deploy hot-loads LoRA "
            "adapters; add `adapters` to export.targets (a full fine-tune is served from merged/ with `tunepipe serve`)"
        )
    per_task = exports["kind"] == "adapters"
    return [Candidate(f"{config.name}-{run}" if per_task else config.name, run, export_dir / rel) for run, rel in adapters.items()]


def gate_verdict(config: DeployConfig, ctx: StageContext, exports: dict[str, Any]) -> tuple[bool, list[str]]:
    """(deploy?, reasons): the evaluate input's verdict, else the one the export recorded."""
    if "evaluate" in ctx.inputs:
        metrics = read_manifest(ctx.inputs["evaluate"].path).metrics
        if "gate_passed" not in metrics:
            raise StageFailed(f"deploy: the evaluate artifact {ctx.inputs['evaluate'].path} has no gate_passed metric")
        gate = {"passed": bool(metrics["gate_passed"]), "reasons": list(metrics.get("gate_reasons") or [])}
    else:
        gate = exports.get("gate")
    if gate is None:
        if config.require_gate:
            return False, ["no gate verdict: the pipeline has no evaluate stage (set deploy.require_gate: false to deploy without one)"]
        return True, ["no gate verdict; deploy.require_gate is false"]
    return gate["passed"], gate["reasons"]


def registry_root(config: DeployConfig, ctx: StageContext) -> str:
    """The configured root, else `<workdir>/registry` (the staging dir is <workdir>/artifacts/deploy/.staging/<key>)."""
    return config.registry or str(ctx.staging_dir.parents[3] / "registry")


# --------------------------------------------------------------------------------------------
# The stage


class DeployStage(Stage):
    """Register, promote, hot-load and smoke-test the exported adapters; roll back on failure."""

    name = "deploy"
    config_model = DeployConfig
    code_modules = ("tasks.deploy", "tasks.adapter_registry", "schemas.deploy", "schemas.registry")

    def run(self, config: DeployConfig, ctx: StageContext) -> StageOutput:
        if "export" not in ctx.inputs:
            raise StageFailed("deploy: needs the `export` stage's artifact as input `export`")
        export_dir = Path(ctx.inputs["export"].path)
        exports = json.loads((export_dir / "exports.json").read_text())
        todo = candidates(config, export_dir, exports)
        registry = AdapterRegistry(registry_root(config, ctx))
        passed, reasons = gate_verdict(config, ctx, exports)
        base = {"gate_passed": passed, "gate_reasons": reasons, "alias": config.alias, "registry": registry.root,
                "server": config.server_url, "names": [c.name for c in todo]}

        if not passed:
            ctx.logger.warning("deploy: not promoting: %s", "; ".join(reasons))
            metrics = {**base, "decision": "not_promoted", "serving": serving_now(registry, todo, config.alias)}
            return self._output(ctx, metrics, f"**Not promoted**: {'; '.join(reasons)}.")

        client = ServerClient(config.server_url, api_key(config), config.timeout_s) if config.server_url else None
        if client is not None:
            client.served()  # unreachable server: fail before the registry changes
        registered, previous, smoke = {}, {}, {}
        promoted: list[Candidate] = []
        try:
            for candidate in todo:
                lineage = Lineage(
                    run=candidate.run, data_key=exports.get("data_key"), base_model=exports.get("base_model"),
                    method=exports.get("method"), source=f"{exports['source']['stage']}:{exports['source']['key']}",
                    export_key=ctx.inputs["export"].key, pipeline_run=ctx.key,
                )
                version = registry.register(candidate.name, candidate.path, lineage)
                registered[candidate.name] = version
                previous[candidate.name] = registry.promote(candidate.name, version, config.alias, reason=f"deploy {ctx.key}")
                if previous[candidate.name] != version:
                    promoted.append(candidate)
                ctx.logger.info("deploy: %s@%s → version %d (was %s)", candidate.name, config.alias, version, previous[candidate.name])
                if client is not None:
                    client.swap(candidate.name, registry.local_path(registry.resolve(f"{candidate.name}@{version}")))
                    smoke[candidate.name] = smoke_test(client, candidate.name, config)
        except DeployError as exc:
            restored = roll_back(registry, client, promoted, previous, config.alias, reason=str(exc))
            raise StageFailed(
                f"deploy: {exc}. Rolled back: {restored}. The candidate versions stay registered "
                f"({registered}); `tunepipe registry promote` serves one by hand."
            ) from None

        metrics = {
            **base, "decision": "promoted", "registered": registered, "previous": previous, "smoke": smoke,
            "hot_loaded": client is not None, "serving": serving_now(registry, todo, config.alias),
        }
        lines = [f"- `{n}@{config.alias}` → version {v} (was {previous[n]})" for n, v in registered.items()]
        return self._output(ctx, metrics, "**Promoted**\n\n" + "\n".join(lines))

    def _output(self, ctx: StageContext, metrics: dict[str, Any], summary: str) -> StageOutput:
        (ctx.staging_dir / "deployment.json").write_text(json.dumps(metrics, indent=1))
        table = [{"name": name, **(entry or {"version": None})} for name, entry in metrics["serving"].items()]
        return StageOutput(metrics=metrics, summary=summary, table=table)


def serving_now(registry: AdapterRegistry, todo: list[Candidate], alias: str) -> dict[str, dict[str, Any] | None]:
    """{name: {version, path}} the alias points at now (None: nothing), for the adapters of this deploy."""
    current = registry.serving(alias)
    return {c.name: ({"version": current[c.name].version, "path": current[c.name].path} if c.name in current else None) for c in todo}


def roll_back(registry: AdapterRegistry, client: ServerClient | None, promoted: list[Candidate], previous: dict[str, int | None], alias: str, *, reason: str) -> dict[str, str]:
    """Undo this run's promotions, newest first: the alias goes back, the previous version is hot-loaded again."""
    restored: dict[str, str] = {}
    for candidate in reversed(promoted):
        before = previous[candidate.name]
        try:
            if before is None:
                registry.unset_alias(candidate.name, alias, reason=reason)
                if client is not None:
                    client.unload(candidate.name)
                restored[candidate.name] = f"{candidate.name}@{alias} removed (it had no earlier version)"
            else:
                entry = registry.rollback(candidate.name, alias, reason=reason)
                if client is not None:
                    client.swap(candidate.name, registry.local_path(entry))
                restored[candidate.name] = f"{candidate.name}@{alias} serves version {before} again"
        except (DeployError, StageFailed) as exc:  # the registry is already back; say the server is not
            restored[candidate.name] = f"{candidate.name}@{alias} is version {before} in the registry, but reloading the server failed: {exc}"
    return restored
