"""B5, communication: parameters and bytes per client, per round and per run, for every method on real
model shapes (built on the meta device: no weights are needed), with the ratios between methods.

Reproduces the Fed-SB paper's Mistral-7B count: Fed-SB r=200 exchanges 32 * 7 * 200^2 = 8,960,000
parameters a round, FedIT r=32 83,886,080, and FLoRA r=32 with 25 clients has every client download all
25 clients' factors, 2,097,152,000 parameters, about 230x Fed-SB's exchange.

    python benchmarks/communication.py [--rounds 10] [--clients 25] [--lora-rank 32] [--fedsb-ranks 64 200]
"""
from __future__ import annotations

import argparse

from harness import write_results

from fedlora.comm import communication_report
from fedlora.config import build_config

MODELS = ["minilm-l6", "roberta-large", "llama-3.2-3b", "mistral-7b"]
NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedsb": "Fed-SB", "fedex": "FedEx-LoRA", "flora": "FLoRA",
         "fedsa": "FedSA-LoRA", "full": "full FedAvg"}


def method_rows(model: str, lora_rank: int, fedsb_ranks: list[int], clients: int, rounds: int) -> list[dict]:
    variants = [(m, lora_rank) for m in ("fedit", "ffa", "fedex", "flora", "fedsa")]
    variants += [("fedsb", r) for r in fedsb_ranks] + [("full", lora_rank)]
    public_setup = build_config({"fedsb": {"init_data": "public", "public_data": {"name": "imdb"}}})
    rows = []
    for method, rank in variants:
        report = communication_report(model, method, rank, clients)
        public = communication_report(model, method, rank, clients, settings=public_setup)["init"]
        per_round, init = report["round"], report["init"]
        rows.append({
            "model": model, "method": method, "rank": None if method == "full" else rank, "clients": clients,
            "params_up": per_round["params_up"], "params_down": per_round["params_down"],
            "bytes_up": per_round["bytes_up"], "bytes_down": per_round["bytes_down"],
            "init_bytes_up": init["bytes_up"], "init_bytes_down": init["bytes_down"],
            "run_bytes": rounds * (per_round["bytes_up"] + per_round["bytes_down"])
                         + init["bytes_up"] + init["bytes_down"],
            "run_bytes_public_setup": rounds * (per_round["bytes_up"] + per_round["bytes_down"])
                                      + public["bytes_up"] + public["bytes_down"]})
    reference = next(r for r in rows if r["method"] == "fedsb" and r["rank"] == max(fedsb_ranks))
    for r in rows:
        r["round_ratio_to_fedsb"] = (r["bytes_up"] + r["bytes_down"]) / (reference["bytes_up"] + reference["bytes_down"])
    return rows


def label(row: dict) -> str:
    return NAMES[row["method"]] + (f" r={row['rank']}" if row["rank"] else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds in the per-run totals")
    parser.add_argument("--clients", type=int, default=25, help="clients per round (FLoRA's download grows with it)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--fedsb-ranks", type=int, nargs="+", default=[64, 200])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", default="results/communication.json")
    args = parser.parse_args()

    rows = [row for model in args.models
            for row in method_rows(model, args.lora_rank, args.fedsb_ranks, args.clients, args.rounds)]
    top = max(args.fedsb_ranks)
    print(f"float32, {args.clients} clients per round, per-run totals over {args.rounds} rounds plus the set-up "
          f"exchange; ratio: (up + down) per round over Fed-SB r={top}'s\n")
    print("| model | method | params up / round | params down / round | MB up / round | MB down / round "
          "| set-up MB up + down | MB per run | MB per run, set-up on public data | ratio to Fed-SB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {label(r)} | {r['params_up']:,} | {r['params_down']:,} | {r['bytes_up'] / 1e6:,.1f} | "
              f"{r['bytes_down'] / 1e6:,.1f} | {(r['init_bytes_up'] + r['init_bytes_down']) / 1e6:,.1f} | "
              f"{r['run_bytes'] / 1e6:,.1f} | {r['run_bytes_public_setup'] / 1e6:,.1f} | {r['round_ratio_to_fedsb']:.1f} |")
    checks = {}
    if "mistral-7b" in args.models and top == 200 and args.lora_rank == 32:
        by = {(r["method"], r["rank"]): r for r in rows if r["model"] == "mistral-7b"}
        fedsb, fedit, flora = by[("fedsb", 200)], by[("fedit", 32)], by[("flora", 32)]
        checks = {"fedsb_r200_params_up": fedsb["params_up"], "fedit_r32_params_up": fedit["params_up"],
                  "flora_r32_params_down": flora["params_down"],
                  "flora_download_over_fedsb_upload": flora["params_down"] / fedsb["params_up"]}
        print(f"\nMistral-7B: Fed-SB r=200 sends {fedsb['params_up']:,} parameters a round (paper: 8,960,000), "
              f"FedIT r=32 {fedit['params_up']:,} (paper: 83,886,080); FLoRA r=32 with {args.clients} clients "
              f"downloads {flora['params_down']:,}, {checks['flora_download_over_fedsb_upload']:.0f}x Fed-SB's "
              "upload (paper: about 230x)")
    write_results(args.out, {"benchmark": "B5 communication", "dtype": "float32", "rounds": args.rounds,
                             "clients": args.clients, "rows": rows, "paper_checks": checks})


if __name__ == "__main__":
    main()
