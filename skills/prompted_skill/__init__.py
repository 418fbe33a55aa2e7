"""The prompted skill: turns a prompt plus an LLM into a skill the agent can ask for hypotheses."""
