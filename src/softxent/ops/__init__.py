"""Backends: ``cpu`` holds the torch-op implementation (``impl="torch"``)."""
