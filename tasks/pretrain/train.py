"""The continued-pretraining job: packed corpus blocks through TRL's SFTTrainer as a language-
modelling dataset, in the stage's process or in every worker of a launch.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from pydantic import Field
from tunepipe.schemas.jobs import TrainingJob
from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm import checks
from tunepipe.tasks.lm.encoding import encode_texts
from tunepipe.tasks.lm.modeling import load_tokenizer
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.training.trainer import loss_history


class PretrainJob(TrainingJob):
    """The pretrain stage's training run, as it crosses the launcher."""

    config: PretrainConfig
    model_path: str = Field(description="The model pretraining continues (or the base_model artifact).")
    data_dir: str = Field(description="The data artifact holding corpus.jsonl.")


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


def labels_check(config: PretrainConfig, trainer: Any) -> dict[str, Any]:
    """`labels`: the blocks as the trainer's collator hands them to the model carry labeled tokens."""
    policy = checks.CheckPolicy("pretrain", config.self_checks)
    result = checks.labels_present_check(checks.first_batches(trainer))
    return checks.require(
        "labels", result, f"pretrain: {result['empty_rows']} of the first {result['rows']} training blocks have no labeled "
        "token: the loss would read nothing (is a completion-only or assistant-only loss set on plain text?)", policy,
    )


def self_checks(config: PretrainConfig, trainer: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """`steps` (every requested optimizer step ran) and `loss` (finite, moved)."""
    policy = checks.CheckPolicy("pretrain", config.self_checks)
    return {
        "steps": checks.require_steps("pretrain", metrics["global_step"], trainer, config.training.max_steps, policy),
        "loss": checks.require_loss("pretrain: the loss", loss_history(trainer), metrics.get("train_loss"), policy=policy),
    }


def train_job(job: PretrainJob) -> dict[str, Any]:
    """Run one continued-pretraining job; rank 0 saves the (merged) model into `output_dir`."""
    from tunepipe.tasks.training.trainer import (  # looked up per call: tests replace build_trainer
        build_trainer,
        evaluate,
        fit,
        is_main_process,
        load_base,
        loss_history,
        peak_memory,
        seed_everything,
    )

    config, env = job.config, job.env
    tokenizer = load_tokenizer(job.model_path, revision=config.revision)
    train_texts, val_texts = split_corpus(read_corpus(job.data_dir), config.validation_fraction)
    if not train_texts:
        raise StageFailed(f"pretrain: no documents with text in {job.data_dir}/corpus.jsonl")
    # Only `bfd` cuts documents; `bfd_split` and `wrapped` carry the overflow into further blocks.
    cut = config.max_length if config.packing == "bfd" else None
    train_rows, truncated = encode_texts(train_texts, tokenizer, max_length=cut)
    val_rows, _ = encode_texts(val_texts, tokenizer, max_length=cut)
    seed_everything(config.training.seed)  # before the adapter's initialisation draws
    model = load_base(job.model_path, config.method, env, config.revision, packing=config.packing)
    model = peft_methods.apply_method(model, config.method, gradient_checkpointing=env.gradient_checkpointing)
    trainer = build_trainer(
        model=model, tokenizer=tokenizer, method=config.method, env=env, training=config.training,
        train_rows=train_rows, eval_rows={"validation": val_rows} if val_rows else {},
        checkpoint_dir=job.checkpoint_dir, max_length=config.max_length, packing=config.packing,
    )
    trainable, total = peft_methods.count_parameters(trainer.model)
    checks = {"labels": labels_check(config, trainer)}  # before training: an unlabeled block would train on nothing
    metrics = fit(trainer, job.checkpoint_dir)
    checks.update(self_checks(config, trainer, metrics))
    metrics.update(evaluate(trainer))
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = round(math.exp(min(metrics["eval_loss"], 50)), 4)
    if is_main_process():
        final = trainer.model
        if config.method.is_peft:
            final = final.merge_and_unload()
        final.config.use_cache = True
        final.save_pretrained(job.output_dir)
        tokenizer.save_pretrained(job.output_dir)
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
            "checks": checks,
            **peak_memory(),
        }
    )
    return metrics
