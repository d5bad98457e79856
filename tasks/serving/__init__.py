"""Serving: one base model with many LoRA adapters behind an OpenAI-compatible HTTP API.

    engines/      one module per engine (embedded, vllm, llamacpp) behind one interface (base.py), registered by
                  name (__init__.py): build/start/stop/health and the request fields each honours
    app.py        the one app skeleton every engine answers through: bearer check, OpenAI's error shape, body limits
    supervise.py  runs a resolved config in the foreground, any engine (what `tunepipe serve` does)
    protocol.py   request models (the OpenAI fields we honour) and OpenAI-format errors
    engine.py     transformers + peft: one base, many adapters, mixed-adapter batched generation
    batcher.py    collects concurrent requests into batches for the engine's single worker thread
    embedded.py   the FastAPI app (the `embedded` engine): /v1/models, completions, chat, LoRA load/unload
    router.py     online A/B: a weighted split between adapter versions, one JSONL line per request
    vllm.py       vLLM's server: `vllm serve` command line and environment, process lifecycle
    front.py      tunepipe's front before vLLM's and llama.cpp's servers (confinement, versioned names, A/B)
    process.py    run a uvicorn server in a thread; wait for an HTTP health check
    settings.py   what to serve: CLI/config values over the registry's current adapters over the profile
    registry.py   the adapter registry: versions, aliases, lineage, in plain files (local or fsspec)
    client.py     a client of a running server: chat, runtime adapter load/unload (deploy uses it)
"""
