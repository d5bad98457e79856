"""The `pretrain` stage (optional): continued pretraining on the data artifact's `corpus.jsonl`.

Next-token loss on every token of every document, documents packed into `max_length` blocks
by TRL's SFTTrainer (language-modelling dataset, `bfd_split` by default: best-fit packing with
position ids restarting per document, so documents do not attend to each other, and long
documents split rather than cut). The artifact is a full model directory at its root (LoRA is
merged into the weights), so the `sft` stage uses it as its base model like any other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from schemas.environment import EnvironmentProfile
from schemas.pretrain import PretrainConfig
from tasks.jsonl import read_jsonl
from tasks.sft import TrainingStage, resolve_model
from tasks.stage import StageContext, StageFailed, StageOutput

ENTRYPOINT = "tasks.pretrain:train_job"


def read_corpus(data_dir: str | Path) -> list[dict[str, Any]]:
    """`corpus.jsonl` records with a non-empty `text`."""
    path = Path(data_dir) / "corpus.jsonl"
    if not path.exists():
        raise StageFailed(f"pretrain: {path} does not exist: the data stage wrote no corpus (add text sources to data:)")
    return [r for r in read_jsonl(path) if isinstance(r.get("text"), str) and r["text"].strip()]


def split_corpus(records: list[dict[str, Any]], fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) texts; a document's side is fixed by a hash of its id (stable as the corpus grows)."""
    train, validation = [], []
    for i, record in enumerate(records):
        ident = str(record.get("id", i))
        bucket = int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (validation if bucket < fraction else train).append(record["text"])
    if not train and validation:
        train, validation = validation, []
    return train, validation


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one continued-pretraining job; rank 0 saves the (merged) model into `output_dir`."""
    import math

    from tasks import peft_methods
    from tasks.modeling import load_tokenizer
    from tasks.sft.data import encode_texts
    from tasks.sft.train import build_trainer, evaluate, fit, is_main_process, load_base, loss_history, peak_memory

    config = PretrainConfig.model_validate(job["config"])
    env = EnvironmentProfile.model_validate(job["env"])
    tokenizer = load_tokenizer(job["model_path"], revision=config.revision)
    train_texts, val_texts = split_corpus(read_corpus(job["data_dir"]), config.validation_fraction)
    if not train_texts:
        raise StageFailed(f"pretrain: no documents with text in {job['data_dir']}/corpus.jsonl")
    # Only `bfd` cuts documents; `bfd_split` and `wrapped` carry the overflow into further blocks.
    cut = config.max_length if config.packing == "bfd" else None
    train_rows, truncated = encode_texts(train_texts, tokenizer, max_length=cut)
    val_rows, _ = encode_texts(val_texts, tokenizer, max_length=cut)
    model = load_base(job["model_path"], config.method, env, config.revision)
    model = peft_methods.apply_method(model, config.method, gradient_checkpointing=env.gradient_checkpointing)
    trainer = build_trainer(
        model=model, tokenizer=tokenizer, method=config.method, env=env, training=config.training,
        train_rows=train_rows, eval_rows={"validation": val_rows} if val_rows else {},
        checkpoint_dir=job["checkpoint_dir"], max_length=config.max_length, packing=config.packing,
    )
    trainable, total = peft_methods.count_parameters(trainer.model)
    metrics = fit(trainer, job["checkpoint_dir"])
    metrics.update(evaluate(trainer))
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = round(math.exp(min(metrics["eval_loss"], 50)), 4)
    if is_main_process():
        final = trainer.model
        if config.method.is_peft:
            final = final.merge_and_unload()
        final.config.use_cache = True
        final.save_pretrained(job["output_dir"])
        tokenizer.save_pretrained(job["output_dir"])
    metrics.update(
        {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0,
            "documents": len(train_texts),
            "validation_documents": len(val_texts),
            "blocks": len(trainer.train_dataset),
            "corpus_tokens": sum(len(r["input_ids"]) for r in train_rows),
            "truncated": truncated,
            "loss_history": loss_history(trainer),
            **peak_memory(),
        }
    )
    return metrics


class PretrainStage(TrainingStage):
    """Continued pretraining of the base model on the corpus; publishes a full model directory."""

    name = "pretrain"
    config_model = PretrainConfig
    code_modules = ("tasks.pretrain", "tasks.sft", "tasks.peft_methods", "tasks.launcher", "schemas.pretrain", "schemas.sft")
    resumable = True

    def run(self, config: PretrainConfig, ctx: StageContext) -> StageOutput:
        from tasks.launcher import run_training
        from tasks.plan import check_fit
        from tasks.sft.train import plot_loss, write_json

        if "data" not in ctx.inputs:
            raise StageFailed("pretrain: needs the `data` stage's artifact as input `data`")
        model_path = resolve_model(config.model, ctx.inputs, "pretrain", ("base_model",))
        plan = check_fit(model_path, config.method, ctx.env, config.max_length)
        job = {
            "config": config.model_dump(mode="json"),
            "env": ctx.env.model_dump(mode="json"),
            "model_path": model_path,
            "data_dir": ctx.inputs["data"].path,
            "output_dir": str(ctx.staging_dir),
            "checkpoint_dir": str(ctx.checkpoint_dir / "run"),
        }
        metrics = run_training(ENTRYPOINT, job, ctx.env, ctx.logger, ctx.checkpoint_dir / "launch")
        plot_loss(metrics["loss_history"], ctx.staging_dir / "loss_curve.png", f"pretrain ({config.method.name})")
        write_json(ctx.staging_dir / "pretrain_metrics.json", metrics)
        metrics["planned_memory_gb"] = plan["memory"]["total_gb"]
        table = [
            {"property": "documents", "value": f"{metrics['documents']} train, {metrics['validation_documents']} validation"},
            {"property": "blocks", "value": f"{metrics['blocks']} x {config.max_length} tokens ({config.packing})"},
            {"property": "steps", "value": metrics["global_step"]},
            {"property": "train loss", "value": metrics["train_loss"]},
            {"property": "eval loss / perplexity", "value": f"{metrics.get('eval_loss')} / {metrics.get('eval_perplexity')}"},
            {"property": "tokens/s", "value": metrics["tokens_per_second"]},
            {"property": "trainable parameters", "value": f"{metrics['trainable_parameters']:,} ({metrics['trainable_percent']}%)"},
            {"property": "truncated documents", "value": metrics["truncated"]},
        ]
        summary = (
            f"Continued pretraining ({config.method.name}) on {metrics['documents']} documents "
            f"({metrics['corpus_tokens']:,} tokens) for {metrics['global_step']} steps; train loss "
            f"{metrics['train_loss']}, eval perplexity {metrics.get('eval_perplexity')}."
        )
        return StageOutput(metrics=metrics, summary=summary, table=table)
