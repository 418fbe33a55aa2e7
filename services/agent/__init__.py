"""The agent: routes each user turn through a distribution's pipeline and keeps the dialog state."""
