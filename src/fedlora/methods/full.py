"""Full FedAvg of the target weights themselves: the reference every adapter method is compared with."""
from .base import Exchange, Method


class FullFedAvg(Method):
    name = "full"
    parameterisation = "full"
    trains = uploads = downloads = ("weight",)

    def initialise(self, ctx):
        self.global_state = self.adapted.state() | self.adapted.head_init(ctx.generator)
        return Exchange()
