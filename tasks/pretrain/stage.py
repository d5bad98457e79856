"""The `pretrain` stage (optional): continued pretraining on the data artifact's `corpus.jsonl`.

Next-token loss on every token of every document, documents packed into `max_length` blocks
by TRL's SFTTrainer (language-modelling dataset, `bfd_split` by default: best-fit packing with
position ids restarting per document, so documents do not attend to each other, and long
documents split rather than cut). The artifact is a full model directory at its root (LoRA is
merged into the weights), so the `sft` stage uses it as its base model like any other.
"""

from __future__ import annotations

from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.tasks.pretrain.train import PretrainJob
from tunepipe.tasks.core.stage import StageContext, StageOutput
from tunepipe.tasks.lm.checks import warned_markdown
from tunepipe.tasks.training.launcher import run_training
from tunepipe.tasks.training.memory_plan import check_fit
from tunepipe.tasks.training.plots import plot_loss
from tunepipe.tasks.training.stage_base import TrainingStage, resolve_model
from tunepipe.tasks.training.trainer import write_json

ENTRYPOINT = "tunepipe.tasks.pretrain.train:train_job"


class PretrainStage(TrainingStage):
    """Continued pretraining of the base model on the corpus; publishes a full model directory."""

    name = "pretrain"
    config_model = PretrainConfig
    resumable = True

    def run(self, config: PretrainConfig, ctx: StageContext) -> StageOutput:
        model_path = resolve_model(config.model, ctx.inputs, "pretrain", ("base_model",))
        plan = check_fit(model_path, config.method, ctx.env, config.max_length, config.training, config.packing)
        job = PretrainJob(
            config=config, env=ctx.env, model_path=model_path, data_dir=ctx.inputs["data"].path,
            output_dir=str(ctx.staging_dir), checkpoint_dir=str(ctx.checkpoint_dir / "run"),
        )
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
        ) + warned_markdown(metrics["checks"])
        return StageOutput(metrics=metrics, summary=summary, table=table)
