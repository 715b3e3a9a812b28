"""Full FedAvg of the target weights themselves: the reference every adapter method is compared with."""
from .base import Method


class FullFedAvg(Method):
    name = "full"
    exact = True
    parameterisation = "full"
    trains = uploads = downloads = ("weight",)

    def seed_state(self, generator):
        return self.adapted.state() | self.adapted.head_init(generator)
