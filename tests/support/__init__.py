"""Helpers shared by the test suite: free ports, real server processes, error-shape checks."""
