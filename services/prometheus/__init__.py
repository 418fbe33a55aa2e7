"""Prometheus for a distribution (the monitoring.yml overlay): its config, written from the environment."""
