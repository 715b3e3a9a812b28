"""The ServerApp: `flwr run` starts it on the SuperLink; it runs the fedlora config carried by the run config
with FedloraStrategy and writes the simulator's run folder (rounds.jsonl, summary.json, the adapter)."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..federation import FederationServer
from .project import from_run_config
from .strategy import FedloraStrategy, check_supported

def server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; `defaults` stand in for run-config entries the run does not give (run_simulation has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = (defaults or {}) | dict(context.run_config)
        cfg = from_run_config(run_config)
        resume = bool(run_config.get("resume", False))
        secagg = float(run_config.get("secagg-threshold", 0)) or None
        check_supported(cfg, resume, secagg)  # before any weights or data are loaded
        server = FederationServer.from_config(cfg, str(run_config.get("out", "runs/flower")), progress=False)
        strategy = FedloraStrategy(server, round_timeout=float(run_config.get("round-timeout", 600)),
                                   node_wait=float(run_config.get("node-wait", 120)), resume=resume,
                                   secagg=secagg, federated_eval=bool(run_config.get("federated-eval", True)))
        strategy.start(grid)

    return app


app = server_app()
