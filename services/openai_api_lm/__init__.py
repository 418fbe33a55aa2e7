"""The OpenAI-API LLM service: Dream's /respond and /generate_goals over any OpenAI-compatible upstream."""
