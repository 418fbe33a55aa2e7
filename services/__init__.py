"""The platform's services: one sub-package per HTTP service."""
