"""fedlora: federated fine-tuning of language models with low-rank adapters, private by design."""
__version__ = "0.1.0"

from .api import Run, load_config, load_run, make_config, run
from .config import Config
from .tuning import tune

__all__ = ["Config", "METHODS", "Method", "Run", "load_config", "load_run", "make_config", "register_method", "run",
           "tune", "__version__"]


def __getattr__(name: str):
    """The method registry's names, imported when first used (importing fedlora.config leaves the methods out)."""
    if name in ("METHODS", "Method", "register_method"):
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
