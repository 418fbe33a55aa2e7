"""The generic LLM service: one model behind Dream's `/respond` API and OpenAI's `/v1` API."""
