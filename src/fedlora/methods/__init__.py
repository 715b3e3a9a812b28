"""The federated methods, one file each, by config name."""
from ..config import Config
from ..errors import ConfigError
from .base import METHODS, Aggregate, Exchange, InitContext, Method, Request, SetUpPlan
from .fedex import FedExLoRA
from .fedit import FedIT
from .fedsa import FedSALoRA
from .fedsb import FedSB
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .fedsvd import FedSVD
from .flora import FLoRA
from .full import FullFedAvg
from .hetlora import HetLoRA
from .rolora import RoLoRA

METHODS.update({m.name: m for m in (FedIT, FFALoRA, FedSB, FedExLoRA, FLoRA, FedSALoRA, FullFedAvg, FedSVD, RoLoRA,
                                     FlexLoRA, HetLoRA)})


def check_method(cfg: Config) -> type[Method]:
    """The class of the config's method, once it has checked the config (`Method.check_config`): every built
    config goes through it before it is used."""
    method = METHODS.get(cfg.method.name)
    if method is None:
        raise ConfigError(f"config key 'method.name': unknown method {cfg.method.name!r}; choose one of "
                          f"{', '.join(METHODS)}")
    method.check_config(cfg)
    return method


def register_method(method: type[Method]) -> type[Method]:
    """Make a Method subclass selectable as `method.name = "<its name>"` (usable as a class decorator)."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"register_method takes a subclass of fedlora.methods.Method, got {method!r}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{method.__name__} needs a class attribute `name` (the config's method.name)")
    known = METHODS.get(name)
    redefined = known is not None and (known.__module__, known.__qualname__) == (method.__module__, method.__qualname__)
    if known is not None and known is not method and not redefined:  # a class defined again (a notebook) replaces
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = method
    return method


__all__ = ["METHODS", "Method", "check_method", "Aggregate", "Exchange", "InitContext", "Request", "SetUpPlan",
           "register_method"]
