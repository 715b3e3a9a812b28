"""The federated methods, one file each, by config name."""
from .base import Aggregate, Exchange, InitContext, Method, Request
from .fedex import FedExLoRA
from .fedit import FedIT
from .fedsa import FedSALoRA
from .fedsb import FedSB
from .ffa import FFALoRA
from .flora import FLoRA
from .full import FullFedAvg

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedIT, FFALoRA, FedSB, FedExLoRA, FLoRA, FedSALoRA, FullFedAvg)}

__all__ = ["METHODS", "Method", "Aggregate", "Exchange", "InitContext", "Request"]
