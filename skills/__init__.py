"""The platform's skills: one sub-package per skill service."""
