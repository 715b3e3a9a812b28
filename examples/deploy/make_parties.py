"""Write the three parties' files of examples/deploy/three_parties.toml (examples/deploy/data/orgN/train.csv and
eval.csv, CSV with the columns sentence,label; 1 = positive): three organisations whose sentiment data differ
in source, length and size, as real parties' do.

- org0, a film magazine: 240 training and 80 evaluation rows of SST-2's training file (short phrases);
- org1, a review site: 160 and 60 IMDB reviews (training file), each cut to its first sentence of 8 to 40 words;
- org2, a film archive: 100 and 50 long sentences (25 words or more) of SST-2's labelled test file.

    python examples/deploy/make_parties.py [DATA_DIR [OUT]]

DATA_DIR (default $FEDLORA_DATA_DIR) holds sst2/ and imdb/; OUT defaults to examples/deploy/data. The draws
are fixed (seed 0): running it again writes the same files.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def sst2(path: Path) -> list[tuple[str, int]]:
    rows = list(csv.reader(path.open(encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(text.strip(), int(label)) for text, label in rows]


def imdb_first_sentences(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.open(encoding="utf-8"):
        review = json.loads(line)
        text = re.sub(r"<br\s*/?>", " ", review["text"])
        first = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]
        if 8 <= len(first.split()) <= 40:
            rows.append((first, int(review["label"])))
    return rows


def balanced(rows: list[tuple[str, int]], n: int, rnd: random.Random) -> list[tuple[str, int]]:
    """n rows, half of each label, in random order."""
    chosen = []
    for label in (0, 1):
        chosen += rnd.sample([r for r in rows if r[1] == label], n // 2)
    rnd.shuffle(chosen)
    return chosen


def write(folder: Path, rows: list[tuple[str, int]], train: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", rows[:train]), ("eval.csv", rows[train:])):
        with (folder / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            writer.writerows(part)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FEDLORA_DATA_DIR", ""))
    if not (root / "sst2" / "train.tsv").is_file() or not (root / "imdb" / "train.jsonl").is_file():
        sys.exit(f"make_parties.py: {root or 'no folder'} does not hold sst2/train.tsv and imdb/train.jsonl: give "
                 "the data folder as the argument or in FEDLORA_DATA_DIR")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT
    rnd = random.Random(0)
    write(out / "org0", balanced(sst2(root / "sst2" / "train.tsv"), 320, rnd), 240)
    write(out / "org1", balanced(imdb_first_sentences(root / "imdb" / "train.jsonl"), 220, rnd), 160)
    long = [r for r in sst2(root / "sst2" / "test.tsv") if len(r[0].split()) >= 25]
    write(out / "org2", balanced(long, 150, rnd), 100)
    for folder in sorted(out.iterdir()):
        print(folder.name, *(f"{f.name} {sum(1 for _ in f.open()) - 1} rows" for f in sorted(folder.glob("*.csv"))))


if __name__ == "__main__":
    main()
