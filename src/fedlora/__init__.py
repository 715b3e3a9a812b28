"""fedlora: federated fine-tuning of language models with low-rank adapters, private by design."""
__version__ = "0.1.0"

from .api import Run, load_run, make_config, run
from .config import Config, load_config
from .methods import METHODS, Method, register_method

__all__ = ["Config", "METHODS", "Method", "Run", "load_config", "load_run", "make_config", "register_method", "run",
           "__version__"]
