"""Command line: `fedlora run` runs an experiment; `fedlora eval`, `predict` and `export` use a finished run's
model; `fedlora comm` counts communication for a model, `fedlora plot` draws finished runs, `fedlora flower init`
writes a Flower app project."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FedloraError


def cmd_run(args) -> int:
    from . import progress
    from .api import load_config
    from .describe import privacy_spent
    from .simulator import Simulator

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = Simulator(cfg, out, progress=not args.quiet).run(resume=args.resume)
    ev = ("final " + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_eval"].items()) if summary["final_eval"]
          else "no server evaluation")
    if summary.get("baselines"):
        ev += (f" (chance {summary['baselines']['chance']:.4f}, majority class "
               f"{summary['baselines']['majority']:.4f})")
    rounds = summary["rounds"]
    print(f"{summary['method']}: {rounds} round{'' if rounds == 1 else 's'}, {ev}; "
          f"{summary['bytes_up_total']:,} bytes up, {summary['bytes_down_total']:,} bytes down"
          f"{privacy_spent(summary['privacy'])} -> {out}")
    for line in progress.client_eval_lines(summary.get("final_client_eval")):
        print(line)
    return 0


def cmd_eval(args) -> int:
    from .inference import evaluated_count, format_metrics, load_trained

    run = load_trained(args.run, args.set, args.data)
    metrics = run.evaluate()
    print(json.dumps(metrics) if args.json else format_metrics(metrics, evaluated_count(run)))
    return 0


def cmd_predict(args) -> int:
    from .inference import load_trained, open_inputs, predict_lines

    run = load_trained(args.run, args.set)
    lines, source = open_inputs(args.input)
    results = predict_lines(run, lines, source)
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    failed = [str(r["line"]) for r in results if "error" in r]
    if failed:
        raise FedloraError(f"{source}: {len(failed)} of {len(results)} input lines could not be used (line"
                           f"{'s' if len(failed) > 1 else ''} {', '.join(failed[:10])}{', ...' if len(failed) > 10 else ''}): see their output lines")
    return 0


def cmd_export(args) -> int:
    from .inference import export_merged, load_trained

    print(f"wrote {export_merged(load_trained(args.run), args.merged)}")
    return 0


def cmd_tune(args) -> int:
    from .tuning import parse_grid, tune

    out = Path(args.out) if args.out else Path("runs") / f"tune-{Path(args.config).stem}"
    result = tune(args.config, parse_grid(args.grid), out=out, seeds=args.seeds, pick=args.pick,
                  metric=args.metric, holdout_fraction=args.holdout, overrides=args.set, progress=not args.quiet)
    best = next(row for row in result.scores if row["setting"] == result.best)
    spread = f" +- {best['std']:.4f}" if best["std"] is not None else ""
    print(f"best: {', '.join(f'{k}={v}' for k, v in result.best.items())}: {result.metric} {best['mean']:.4f}"
          f"{spread} over {best['n']} seed{'s' if best['n'] > 1 else ''} on held-out training rows -> "
          f"{out / 'best.toml'}")
    return 0


def cmd_methods(args) -> int:
    from .describe import method_lines

    print("\n".join(method_lines()))
    return 0


def cmd_show(args) -> int:
    from .describe import run_lines

    print("\n".join(run_lines(args.run)))
    return 0


def cmd_config(args) -> int:
    from .config_reference import markdown, reference

    print(markdown() if args.markdown else reference(), end="")
    return 0


def cmd_comm(args) -> int:
    from .comm import communication_report
    from .api import load_config

    report = communication_report(args.model, args.method, args.rank, args.clients, args.dtype,
                                  args.target_modules.split(",") if args.target_modules else None,
                                  # the settings are checked against the method and rank counted here
                                  load_config(None, [f"method.name={args.method}", f"adapter.rank={args.rank}",
                                                     *args.set]) if args.set else None)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} / {report['method']} r={report['rank']} ({report['layers']} adapted layers, "
          f"{report['clients']} clients, {report['dtype']})")
    labels = {"round": "per client in odd rounds" if "even_rounds" in report else "per client per round",
              "even_rounds": "per client in even rounds", "init": "per client, once before round 1"}
    for what, label in labels.items():
        part = report.get(what)
        if part is None or what == "init" and not (part["params_up"] or part["params_down"]):
            continue
        if what == "round" and "by_rank" in report:  # printed per rank below
            continue
        print(f"  {label}: up {part['params_up']:,} params ({part['bytes_up']:,} B), "
              f"down {part['params_down']:,} params ({part['bytes_down']:,} B)")
    for rank, part in report.get("by_rank", {}).items():  # adapter.client_ranks
        print(f"  per client of rank {rank} per round: up {part['params_up']:,} params ({part['bytes_up']:,} B), "
              f"down {part['params_down']:,} params ({part['bytes_down']:,} B)")
    return 0


def cmd_plot(args) -> int:
    from .errors import ConfigError
    from .plots import plot_pareto, plot_runs, read_run, run_folders

    folders = run_folders(args.runs) if args.pareto else args.runs
    labels = args.labels.split(",") if args.labels else [None] * len(folders)
    if len(labels) != len(folders):
        raise ConfigError(f"--labels gives {len(labels)} labels for {len(folders)} run folders")
    out = (plot_pareto if args.pareto else plot_runs)([read_run(run, label) for run, label in zip(folders, labels)],
                                                      args.out, args.metric, args.title)
    print(f"wrote {out}")
    return 0


def cmd_flower_init(args) -> int:
    from .api import load_config
    from .errors import ConfigError

    cfg = load_config(args.config, args.set)
    try:
        import tomli_w  # noqa: F401 - installed with Flower; write_app needs it
        from .flower.project import write_app
    except ImportError:
        raise ConfigError("flower init needs Flower: pip install 'fedlora[flower]'") from None
    path = write_app(args.dir, cfg, args.out or Path(args.dir) / "run", args.round_timeout)
    print(f"wrote {path}; run it with: fedlora flower run {args.dir} <superlink connection>")
    return 0


def cmd_flower_run(args) -> int:
    from .flower.launch import flower_run

    return flower_run(args.app, args.connection, args.resume, args.run_config)


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return f"{__version__} (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with low-rank adapters.")
    parser.add_argument("--version", action="version", version=f"fedlora {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated experiment from a TOML config",
                         epilog="Configuration keys: `fedlora config` prints every key with its default and "
                                "meaning (a TOML file to start from); docs/configuration.md explains them.")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", help="output folder (default: runs/<config name>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--quiet", action="store_true",
                     help="print only the final line (no label map, progress bars or round lines)")
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", help="run a grid of settings on held-out training rows and write the best "
                                       "as a config (the evaluation split is never read)")
    tune.add_argument("config")
    tune.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2,...",
                      help="a config key and the values to try; several --grid make their product")
    tune.add_argument("--seeds", type=int, default=1, help="runs per setting, seeds seed, seed+1, ... (default 1)")
    tune.add_argument("--pick", choices=["final", "best"], default="final",
                      help="a trial's metric: at its last evaluation (default) or its best round")
    tune.add_argument("--metric", help="the evaluation metric to choose by (default: accuracy)")
    tune.add_argument("--holdout", type=float, metavar="FRACTION",
                      help="the fraction of the training data held out to evaluate on (default: data.holdout_fraction, "
                           "else 0.1)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tune.add_argument("--out", help="output folder (default: runs/tune-<config name>); a rerun skips finished trials")
    tune.add_argument("--quiet", action="store_true", help="print only the final line")
    tune.set_defaults(func=cmd_tune)

    config = sub.add_parser("config", help="print every configuration key with its default and meaning (TOML)")
    config.add_argument("--markdown", action="store_true",
                        help="print the configuration reference page (docs/configuration.md) instead")
    config.set_defaults(func=cmd_config)

    methods = sub.add_parser("methods", help="every registered method: what a client trains and sends, whether "
                                             "aggregation is exact, client-level DP and SecAgg+ support")
    methods.set_defaults(func=cmd_methods)

    show = sub.add_parser("show", help="a finished run: its config in brief, rounds, final metrics, epsilon, "
                                       "bytes and wall time")
    show.add_argument("run", metavar="RUN_DIR", help="a folder written by `fedlora run`")
    show.set_defaults(func=cmd_show)

    evaluate = sub.add_parser("eval", help="evaluate a finished run's model (accuracy per class or task)")
    evaluate.add_argument("run", metavar="RUN_DIR", help="a folder written by `fedlora run`")
    evaluate.add_argument("--data", metavar="FILE_OR_PRESET",
                          help="evaluate on this file (read with the run's columns) or data set preset; "
                               "default: the run's own evaluation data")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="change a data.*, eval.* or device key")
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser("predict", help="labels (classifiers) or generations (language models) of a "
                                             "finished run's model, one JSON line per input line")
    predict.add_argument("run", metavar="RUN_DIR", help="a folder written by `fedlora run`")
    predict.add_argument("--input", default="-", metavar="FILE",
                         help="one input per line: plain text (a tab between two texts), a JSON string, or a "
                              "JSON object with the run's text columns (or text, text_pair; prompt for language "
                              "models); default: - (standard input). A line that cannot be used gets "
                              '{"line": N, "error": ...} as its output line and the exit status is 2')
    predict.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="change an eval.* key (batch_size, max_new_tokens) or device")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="write a finished run's model as one merged model folder")
    export.add_argument("run", metavar="RUN_DIR", help="a folder written by `fedlora run`")
    export.add_argument("--merged", required=True, metavar="OUT",
                        help="the folder to write: weights with the adapters folded in, config with the class "
                             "names, tokenizer; loads with from_pretrained, without PEFT")
    export.set_defaults(func=cmd_export)

    comm = sub.add_parser("comm", help="parameters and bytes per client per round, without loading weights")
    comm.add_argument("--model", required=True, help="preset name or local model folder")
    comm.add_argument("--method", required=True)
    comm.add_argument("--rank", type=int, required=True)
    comm.add_argument("--clients", type=int, default=1, help="clients per round (FLoRA's download grows with it)")
    comm.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    comm.add_argument("--target-modules", help="comma-separated module-name suffixes")
    comm.add_argument("--json", action="store_true")
    comm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config key that changes the traffic, e.g. fedsb.init")
    comm.set_defaults(func=cmd_comm)

    plot = sub.add_parser("plot", help="plot finished runs: metric vs round, vs bytes, vs epsilon")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `fedlora run`")
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--metric", default="accuracy", help="evaluation metric to plot (default: accuracy)")
    plot.add_argument("--labels", help="comma-separated legend labels, one per run (default: method and rank); "
                                       "runs with the same label and privacy setting are averaged as seeds")
    plot.add_argument("--title")
    plot.add_argument("--pareto", action="store_true",
                      help="instead: the final metric against the whole run's bytes, one marker per method and "
                           "rank (mean over seeds, their spread as error bars), one panel per privacy setting, "
                           "the non-dominated points joined; a RUN_DIR may be a folder of runs (a tuning's or an "
                           "experiment's)")
    plot.set_defaults(func=cmd_plot)

    flower = sub.add_parser("flower", help="run on Flower")
    flower_sub = flower.add_subparsers(dest="flower_command", required=True)
    init = flower_sub.add_parser("init", help="write a Flower app project whose run config is a fedlora config")
    init.add_argument("dir", help="the app folder to write (its pyproject.toml)")
    init.add_argument("config", help="fedlora TOML config")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    init.add_argument("--out", help="folder the ServerApp writes its run into (default: DIR/run)")
    init.add_argument("--round-timeout", type=float, default=600,
                      help="seconds the server waits for a round's replies before dropping the silent clients")
    init.set_defaults(func=cmd_flower_init)
    frun = flower_sub.add_parser("run", help="flwr run APP CONNECTION --stream, exiting non-zero with the reason "
                                             "when the run does not complete")
    frun.add_argument("app", help="the app folder (written by `fedlora flower init`)")
    frun.add_argument("connection", help="the SuperLink connection in $FLWR_HOME/config.toml")
    frun.add_argument("--resume", action="store_true", help="continue the run in the app's output folder from "
                                                            "its last finished round")
    frun.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                      help="a run-config entry for flwr run (e.g. 'fedlora.federation.rounds=5')")
    frun.set_defaults(func=cmd_flower_run)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedloraError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; the last finished round is checkpointed (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
