"""The `deploy` stage: registry version, serving alias, hot-load into the running server, smoke test.

Inputs: `export` (required: its `exports.json` names the adapters, base and data key),
`evaluate` (its `verdict.json` is the only gate verdict deploy acts on; without an evaluate
stage nothing is promoted unless `deploy.require_gate: false`). The verdict names the winner
(the aligned adapters, or the SFT adapters when the aligned ones were held back and SFT passed
against the base); only an export of the winner is promoted, and the summary says which and why.

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

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.handoffs import DeployDecision, ExportIndex, GateVerdict
from tunepipe.schemas.registry import Lineage
from tunepipe.tasks.core.handoff import read_handoff, write_handoff
from tunepipe.tasks.core.stage import Stage, StageContext, StageFailed, StageOutput
from tunepipe.tasks.lm.server_client import ServerClient, ServerError
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.secrets import remember


class DeployError(ServerError):
    """A hot-load or smoke test that failed; triggers the rollback."""


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

    remember(value)  # masked in every log line from here on
    return value


@dataclass(frozen=True)
class Candidate:
    name: str  # registry and served name
    run: str
    path: Path


def candidates(config: DeployConfig, export_dir: Path, exports: ExportIndex) -> list[Candidate]:
    adapters = exports.targets.get("adapters")
    if not adapters:
        raise StageFailed(
            f"deploy: the export artifact {export_dir} has no `adapters` target (kind {exports.kind}): deploy hot-loads LoRA "
            "adapters; add `adapters` to export.targets (a full fine-tune is served from merged/ with `tunepipe serve`)"
        )
    per_task = exports.kind == "adapters"
    return [Candidate(f"{config.name}-{run}" if per_task else config.name, run, export_dir / rel) for run, rel in adapters.items()]


def gate_verdict(config: DeployConfig, ctx: StageContext, exports: ExportIndex | None = None) -> tuple[bool, list[str]]:
    """(deploy?, reasons): the evaluate artifact's verdict, the only source of one. When it names a
    winner (align, or sft when the aligned candidate was held back and sft passed against the base),
    only that artifact is promoted: the export must be of it."""
    if "evaluate" in ctx.inputs:
        verdict = read_handoff(ctx.inputs["evaluate"], GateVerdict, reader="deploy")
        if verdict.winner is None:
            return verdict.passed, ([verdict.winner_reason] if verdict.winner_reason else []) + verdict.reasons
        shipped = exports.source if exports is not None else None
        evidence = verdict.fallback_reasons if verdict.winner != verdict.candidate else verdict.reasons
        if shipped is not None and (shipped.stage != verdict.winner or (verdict.winner_key and shipped.key != verdict.winner_key)):
            return False, [
                f"the export is of {shipped.stage}:{shipped.key}, but evaluate's winner is {verdict.winner}:{verdict.winner_key} "
                f"({verdict.winner_reason}): set export.source to auto (or {verdict.winner})", *verdict.reasons,
            ]
        return True, [f"evaluate's winner {verdict.winner}: {verdict.winner_reason}", *evidence]
    if config.require_gate:
        return False, ["no gate verdict: the pipeline has no evaluate stage (set deploy.require_gate: false to deploy without one)"]
    return True, ["no gate verdict; deploy.require_gate is false"]


def registry_root(config: DeployConfig, ctx: StageContext) -> str:
    """The configured root, else `<workdir>/registry` (the staging dir is <workdir>/artifacts/deploy/.staging/<key>)."""
    return config.registry or str(ctx.staging_dir.parents[3] / "registry")


class DeployStage(Stage):
    """Register, promote, hot-load and smoke-test the exported adapters; roll back on failure."""

    name = "deploy"
    config_model = DeployConfig

    def run(self, config: DeployConfig, ctx: StageContext) -> StageOutput:
        export_dir = Path(ctx.inputs["export"].path)
        exports = read_handoff(ctx.inputs["export"], ExportIndex, reader="deploy")
        todo = candidates(config, export_dir, exports)
        registry = AdapterRegistry(registry_root(config, ctx))
        passed, reasons = gate_verdict(config, ctx, exports)
        base = {"gate_passed": passed, "gate_reasons": reasons, "alias": config.alias, "registry": registry.root,
                "server": config.server_url, "names": [c.name for c in todo], "source": f"{exports.source.stage}:{exports.source.key}"}

        if not passed:
            ctx.logger.warning("deploy: not promoting: %s", "; ".join(reasons))
            metrics = {**base, "decision": "not_promoted", "serving": serving_now(registry, todo, config.alias)}
            return self._output(ctx, metrics, f"**Not promoted** ({exports.source.stage} adapters): {'; '.join(reasons)}.")

        client = ServerClient(config.server_url, api_key(config), config.timeout_s) if config.server_url else None
        if client is not None:
            client.served()  # unreachable server: fail before the registry changes
        registered, previous, smoke = {}, {}, {}
        promoted: list[Candidate] = []
        try:
            for candidate in todo:
                lineage = Lineage(
                    run=candidate.run, data_key=exports.data_key, base_model=exports.base_model,
                    method=exports.method, source=f"{exports.source.stage}:{exports.source.key}",
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
        except ServerError as exc:
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
        shipped = f"{exports.source.stage} ({exports.method}) adapters: {reasons[0]}"
        return self._output(ctx, metrics, f"**Promoted** the {shipped}\n\n" + "\n".join(lines))

    def _output(self, ctx: StageContext, metrics: dict[str, Any], summary: str) -> StageOutput:
        write_handoff(ctx.staging_dir, DeployDecision.model_validate(metrics))
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
        except (ServerError, StageFailed) as exc:  # the registry is already back; say the server is not
            restored[candidate.name] = f"{candidate.name}@{alias} is version {before} in the registry, but reloading the server failed: {exc}"
    return restored
