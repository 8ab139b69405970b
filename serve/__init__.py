"""Ray Serve application: remediation and OpenAI-compatible endpoints (next stage)."""
