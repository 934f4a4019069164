"""Edgewise: build image models on a CPU, ship them signed to edge devices, run them privately."""
__version__ = "0.1.0"
