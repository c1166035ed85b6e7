"""reslab: residual networks (He et al., 2015) built exactly, inspected, trained and deployed."""

__version__ = "0.1.0"

from reslab.errors import ReslabError  # noqa: E402
from reslab.models import create_model, list_models  # noqa: E402

__all__ = ["ReslabError", "create_model", "list_models", "__version__"]
