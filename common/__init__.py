"""Code and configs shared by every service of the platform."""
