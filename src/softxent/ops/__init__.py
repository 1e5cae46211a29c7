"""Backends: ``cpu`` holds the torch-op implementation (``impl="torch"``), ``triton`` the Triton kernels
(``impl="triton"``)."""
