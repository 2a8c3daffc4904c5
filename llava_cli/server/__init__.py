"""`llava serve`: the OpenAI-compatible HTTP layer over the runtime (schema, routes, streaming)."""
