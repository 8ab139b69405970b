"""Ray Serve application: the policy model online (docs/serve.md).

    app.py            the deployment: /v1/remediate, /v1/chat/completions (SSE too), /v1/models,
                      /healthz, /metrics; dynamic batching with @serve.batch
    remediate.py      request checks, the benchmark's prompt, dry-run / execute through
                      simulators.playbook.execution.run_pipeline and the verifier; the token
    schemas.py        pydantic request bodies (the report mirrors DiagnosisReport); 4xx messages
    engine.py         the rollout engine (train/rollout.py) for a model, checkpoint or LoRA adapter
    config.py         ServeConfig (configs/serve.yaml); launch.py starts/stops Ray + Serve + nginx
    proxy.py          the admission front: nginx's configuration and process (timeouts, connection limits)
    metrics.py        Prometheus counters (Ray's export and GET /metrics)

Started by `remed serve --model DIR` or `serve run --address local configs/serve-ray.yaml`.
"""
