"""reslab: residual networks (He et al., 2015) built exactly, inspected, trained and deployed."""

__version__ = "0.1.0"

from reslab.errors import ReslabError  # noqa: E402

__all__ = ["ReslabError", "create_model", "list_models", "__version__"]


def __getattr__(name):
    # The model zoo imports torch; keep `import reslab` (and the CLI's start) cheap until it is used.
    if name in ("create_model", "list_models"):
        # The zoo plus the weights catalog: create_model("resnet50.tv2_in1k", pretrained=True).
        from reslab import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'reslab' has no attribute {name!r}")
