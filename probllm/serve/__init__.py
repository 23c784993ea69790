"""`probllm serve`: the model, and with an index the course assistant, as an OpenAI-compatible HTTP service."""
