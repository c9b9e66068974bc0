"""OpenAI-compatible serving: the FastAPI app over the engine, request schemas, metrics, and the load test."""
