"""B4, memory as clients grow: peak RSS and time per round of a run with 10, 100 and 1,000 clients, the
same clients per round, local steps and rounds (so the same total training), Fed-SB and FFA-LoRA on
all-MiniLM-L6-v2 with SST-2. Every run is its own process, so each peak is that run's alone.
With --population: populations of 10^3 to 10^6 clients under client-level DP (a Poisson cohort of 10 expected
clients), each client's 4 to 40 sentences drawn from SST-2 when it is sampled (data.partition = "sampled").
With --same-cohort as well, every round's cohort is exactly 10 clients of 22 sentences each (drawn uniformly
without replacement instead of by Poisson sampling), so that a round's work is the same at every population
size and its time compares: these runs measure cost only (the accountant assumes Poisson cohorts).

    FEDLORA_DATA_DIR=../shared/data python benchmarks/clients_memory.py [--clients 10 100 1000] [--rounds 3]
    FEDLORA_DATA_DIR=../shared/data python benchmarks/clients_memory.py --population [--same-cohort] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import resource
import subprocess
import sys
import tempfile

from harness import write_results


def child(method: str, num_clients: int, rounds: int, population: bool, same_cohort: bool) -> None:
    from fedlora.config import build_config
    from fedlora.simulator import Simulator

    raw = {
        "seed": 0, "method": {"name": method}, "model": {"name": "minilm-l6"}, "adapter": {"rank": 16},
        "data": {"name": "sst2", "partition": "iid", "max_length": 64},
        "federation": {"num_clients": num_clients, "clients_per_round": 10, "rounds": rounds},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 1e-3},
        "eval": {"every": 0, "max_examples": 64}, "fedsb": {"init_examples": 64}}
    if population:  # client-level DP over an artificial population; Fed-SB sets up from public text
        raw["data"] |= {"partition": "sampled", "client_examples": [4, 40]}
        raw["privacy"] = {"unit": "client", "epsilon": 8.0}
        raw["fedsb"] |= {"init_data": "public", "public_data": {"name": "imdb"}}
    if same_cohort:
        from fedlora.privacy.client_level import ClientLevelDP
        from fedlora.privacy.randomness import sampling_rng

        raw["data"]["client_examples"] = [22, 22]

        def cohort(self, r):  # exactly clients_per_round, uniformly: the same work every round
            fed = self.cfg.federation
            return sorted(int(c) for c in sampling_rng(self.cfg, "cohort", r).choice(
                fed.num_clients, fed.clients_per_round, replace=False))

        ClientLevelDP.cohort = cohort
    cfg = build_config(raw)
    with tempfile.TemporaryDirectory() as out:
        Simulator(cfg, out, progress=False).run()
        rows = [json.loads(line) for line in open(f"{out}/rounds.jsonl")][1:]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds = [r["seconds"] for r in rows]
    # a Poisson cohort's size varies from round to round: the time per client of the cohort compares fairly
    per_client = [r["seconds"] / len(r["clients"]) for r in rows if r["clients"]]
    print(json.dumps({"peak_rss_mb": peak_kib / 1024, "round_seconds": statistics.median(seconds),
                      "seconds_per_client": statistics.median(per_client),
                      "cohort_sizes": [len(r["clients"]) for r in rows]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", help="default: 10 100 1000; with --population "
                                                                   "1000 10000 100000 1000000")
    parser.add_argument("--population", action="store_true", help="client-level DP over sampled populations")
    parser.add_argument("--same-cohort", action="store_true",
                        help="with --population: exactly 10 clients of 22 sentences a round, for the round time")
    parser.add_argument("--methods", nargs="+", default=["fedsb", "ffa"])
    parser.add_argument("--rounds", type=int, default=3, help="at least 2: the first round is not timed")
    parser.add_argument("--out", help="default: results/clients_memory.json, with --population "
                                      "results/clients_population.json")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "CLIENTS", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.clients = args.clients or ([10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6] if args.population else [10, 100, 1000])
    args.out = args.out or ("results/clients_population_same_cohort.json" if args.same_cohort else
                            f"results/clients_{'population' if args.population else 'memory'}.json")
    if args.same_cohort and not args.population:
        parser.error("--same-cohort applies to --population")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round, with its warm-up, is not timed)")
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.population, args.same_cohort)
        return

    rows = []
    for method in args.methods:
        for n in args.clients:
            done = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(args.rounds)]
                                  + ["--population"] * args.population + ["--same-cohort"] * args.same_cohort,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{method} with {n} clients failed:\n{done.stderr[-2000:]}")
            rows.append({"method": method, "clients": n} | json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for r in rows:
        smallest = next(s for s in rows if s["method"] == r["method"] and s["clients"] == min(args.clients))
        r["rss_ratio_to_smallest"] = r["peak_rss_mb"] / smallest["peak_rss_mb"]
        r["time_ratio_to_smallest"] = r["round_seconds"] / smallest["round_seconds"]
        r["per_client_ratio_to_smallest"] = r["seconds_per_client"] / smallest["seconds_per_client"]
    cohort = ("a Poisson cohort of 10 expected clients, client-level DP at epsilon 8, clients of 4-40 sampled "
              "sentences" if args.population else "10 clients a round")
    if args.same_cohort:
        cohort = "exactly 10 clients of 22 sampled sentences a round, client-level DP's noise at epsilon 8"
    print(f"\nall-MiniLM-L6-v2 rank 16, SST-2, {cohort} x 2 steps of batch 8, {args.rounds} rounds\n")
    print(f"| method | clients | peak RSS (MB) | RSS / {min(args.clients)} clients | median round (s) | "
          f"time / {min(args.clients)} clients | s per cohort client | that / {min(args.clients)} clients |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['clients']:,} | {r['peak_rss_mb']:,.0f} | {r['rss_ratio_to_smallest']:.3f} | "
              f"{r['round_seconds']:.2f} | {r['time_ratio_to_smallest']:.2f} | {r['seconds_per_client']:.3f} | "
              f"{r['per_client_ratio_to_smallest']:.2f} |")
    write_results(args.out, {"benchmark": "B4 clients_memory" + (" --population" if args.population else "")
                             + (" --same-cohort" if args.same_cohort else ""),
                             "model": "all-MiniLM-L6-v2", "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
