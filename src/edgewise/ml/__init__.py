"""Edgewise ML: datasets, backbones and the recipes that turn them into bundles.

Invariant: this package only produces bundles through `edgewise.artifacts.write_bundle`; it
never imports the server or the agent.
"""

from .errors import BackboneError, DatasetError, ExportError, MLError

__all__ = ["BackboneError", "DatasetError", "ExportError", "MLError"]
