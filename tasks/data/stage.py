"""The `data` stage: sources → parse → clean → dedup → split → contamination → validate → mix.

Every input record ends in exactly one output file: train/validation/test.jsonl (supervised),
preferences.jsonl, corpus.jsonl, or rejected.jsonl with its reason and `file:line`. Upsampled
copies in train.jsonl are the only extra lines; the report counts them apart
(`train_after_mix`), so `read == kept + rejected_total` always holds.

The engines run it: `run.py` (local, and the run the others build on), `streaming.py` and
`ray_engine.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunepipe.schemas.data import DataConfig, source_files
from tunepipe.tasks.core.fingerprint import content_digest
from tunepipe.tasks.core.stage import Stage, StageContext, StageOutput
from tunepipe.tasks.data.run import _DataRun
from tunepipe.tasks.data.streaming import StreamingDataRun


class DataStage(Stage):
    """Raw sources → cleaned, deduplicated, validated, split and mixed training data."""

    name = "data"
    config_model = DataConfig

    def key_payload(self, config: DataConfig) -> Any:
        """The config with every source path replaced by the digests of the files it names."""
        # How the records flow (engine, cluster) does not change the result: not part of the key.
        payload = config.model_dump(mode="json", exclude={"engine", "ray"})
        for source, dumped in zip(config.sources, payload["sources"]):
            if source.is_remote:
                dumped["path"] = {"hub": source.path, "revision": source.revision}
            else:
                dumped["path"] = sorted(content_digest(f) for f in source_files(source.path))
        tokenizer = config.clean.tokenizer
        if tokenizer is not None and Path(tokenizer).exists():
            payload["clean"]["tokenizer"] = content_digest(tokenizer)
        return payload

    def run(self, config: DataConfig, ctx: StageContext) -> StageOutput:
        if config.engine == "ray":
            from tunepipe.tasks.data.ray_engine import RayDataRun  # lazy: pulls in pyarrow, only for engine: ray

            return RayDataRun(config, ctx).run()
        if config.engine == "streaming":
            return StreamingDataRun(config, ctx).run()
        return _DataRun(config, ctx).run()
