"""Split a training set's indices among federated clients.

`partition` returns one sorted index array per client (clients shuffle their own batches);
the arrays are disjoint and the result depends only on the arguments, including `seed`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "label_proportion", "task", "sampled")
MAX_DIRICHLET_DRAWS = 1000


def partition(labels: Sequence[int] | np.ndarray, num_clients: int, scheme: str, *, seed: int,
              dirichlet_alpha: float = 0.5, label_proportions: Sequence[Sequence[float]] | None = None,
              min_client_examples: int = 1, num_labels: int | None = None) -> list[np.ndarray]:
    """Indices of each client's examples.

    iid: a random permutation cut into near-equal shards.
    dirichlet: per class, proportions over clients ~ Dir(alpha); redrawn until every client
        has at least `min_client_examples`.
    label_proportion: client i's label mix is `label_proportions[i]`; every client gets the same
        number of examples, as many as the labels allow.
    task: `labels` are group ids (task ids for language-model data, label ids for classification);
        every client holds one group. Groups go to clients round-robin in a seeded random order and
        a group's examples are split evenly among the clients that hold it.
    `num_labels` defaults to max(labels) + 1.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(labels)
    if num_clients < 1:
        raise DataError(f"config key 'federation.num_clients': need at least 1 client, got {num_clients}")
    if n < num_clients:
        raise DataError(f"config key 'federation.num_clients': {num_clients} clients but only {n} training examples")
    if n and labels.min() < 0:
        raise DataError(f"labels must be non-negative, got {labels.min()}")
    if num_clients * min_client_examples > n:
        raise DataError(f"config key 'data.min_client_examples': {num_clients} clients x {min_client_examples} "
                        f"examples exceeds the {n} training examples")
    num_labels = int(labels.max()) + 1 if num_labels is None else num_labels
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, rng, dirichlet_alpha, min_client_examples)
    elif scheme == "label_proportion":
        parts = _label_proportion(labels, num_clients, rng, label_proportions, num_labels, min_client_examples)
    elif scheme == "task":
        parts = _by_task(labels, num_clients, rng, min_client_examples)
    else:
        raise DataError(f"config key 'data.partition': unknown scheme '{scheme}' (schemes: {', '.join(SCHEMES)})")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float,
               min_client_examples: int) -> list[np.ndarray]:
    if alpha <= 0:
        raise DataError(f"config key 'data.dirichlet_alpha': must be positive, got {alpha}")
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in class_indices:
            shuffled = rng.permutation(indices)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
        sizes = [sum(len(p) for p in client) for client in parts]
        smallest = max(smallest, min(sizes))
        if min(sizes) >= min_client_examples:
            return [np.concatenate(client) for client in parts]
    raise DataError(
        f"config key 'data.dirichlet_alpha' = {alpha}: in {MAX_DIRICHLET_DRAWS} draws no partition of "
        f"{len(labels)} examples over {num_clients} clients gave every client at least {min_client_examples} "
        f"examples (data.min_client_examples; best draw: {smallest}); raise data.dirichlet_alpha or lower "
        f"data.min_client_examples or federation.num_clients")


def _by_task(groups: np.ndarray, num_clients: int, rng: np.random.Generator,
             min_client_examples: int) -> list[np.ndarray]:
    names = np.unique(groups)
    if num_clients < len(names):
        raise ConfigError(f"config key 'federation.num_clients': the 'task' partition gives every client one task, "
                          f"so it needs at least {len(names)} clients for the {len(names)} tasks, got {num_clients}")
    order = rng.permutation(names)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for position, group in enumerate(order):
        holders = range(position, num_clients, len(order))
        shuffled = rng.permutation(np.flatnonzero(groups == group))
        for client, piece in zip(holders, np.array_split(shuffled, len(holders))):
            if len(piece) < min_client_examples:
                raise DataError(
                    f"config key 'data.min_client_examples': task {int(group)} has {len(shuffled)} examples for "
                    f"{len(holders)} clients, fewer than {min_client_examples} each; lower federation.num_clients")
            parts[client] = piece
    return parts


def _label_proportion(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                      label_proportions, num_labels: int, min_client_examples: int) -> list[np.ndarray]:
    proportions = _check_proportions(label_proportions, num_clients, num_labels)
    available = np.bincount(labels, minlength=num_labels)[:num_labels]
    demand = proportions.sum(axis=0)  # examples of each label per unit of client size
    used = demand > 0
    size = int(np.floor(np.min(available[used] / demand[used])))
    size = min(size, len(labels) // num_clients)
    # rounding can take up to one extra example per client from a label: shrink until it fits
    while size > 0 and np.any(_client_counts(proportions, size).sum(axis=0) > available):
        size -= 1
    if size < min_client_examples:
        raise DataError(
            f"config key 'data.label_proportions': the training labels (counts {available.tolist()}) allow only "
            f"{size} examples per client, fewer than data.min_client_examples = {min_client_examples}")
    counts = _client_counts(proportions, size)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in range(num_labels):
        shuffled = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for client in range(num_clients):
            parts[client].append(shuffled[start:start + counts[client, label]])
            start += counts[client, label]
    return [np.concatenate(client) for client in parts]


def _check_proportions(label_proportions, num_clients: int, num_labels: int) -> np.ndarray:
    key = "config key 'data.label_proportions'"
    if label_proportions is None:
        raise DataError(f"{key} is required when data.partition = 'label_proportion'")
    rows = list(label_proportions)
    if len(rows) != num_clients:
        raise DataError(f"{key}: {len(rows)} rows for {num_clients} clients; give one row per client")
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != num_labels:
            raise DataError(f"{key} row {i}: {len(row)} entries, but the data has {num_labels} labels")
        if any(not np.isfinite(p) or p < 0 for p in row):
            raise DataError(f"{key} row {i}: entries must be non-negative, got {row}")
        if abs(sum(row) - 1.0) > 1e-6:
            raise DataError(f"{key} row {i}: entries must sum to 1, got {sum(row):.6g}")
    return np.asarray(rows, dtype=np.float64)


def _client_counts(proportions: np.ndarray, size: int) -> np.ndarray:
    """Per-client label counts summing to `size`: largest-remainder rounding of proportions * size."""
    exact = proportions * size
    counts = np.floor(exact).astype(np.int64)
    for client in range(len(counts)):
        short = size - counts[client].sum()
        if short > 0:
            # stable sort: ties go to the lower label
            order = np.argsort(-(exact[client] - counts[client]), kind="stable")
            counts[client, order[:short]] += 1
    return counts


def stratified_sample(labels: Sequence[int] | np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices drawn at random, every label represented in proportion to its share (largest
    remainders round the shares to whole examples), sorted; all indices when `size` covers them."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[:size - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


class PopulationSizes(Sequence):
    """The sizes of an artificial population's clients (SampledPopulation), each computed when asked from the
    seed and the client's index alone: nothing is held per client."""

    def __init__(self, num_clients: int, low: int, high: int, seed: int):
        self.num_clients, self.low, self.high, self.seed = num_clients, low, high, seed

    def __len__(self) -> int:
        return self.num_clients

    def draw(self, client: int) -> np.random.Generator:
        """The generator of client `client`'s size and then its rows."""
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} is not in a population of {self.num_clients}")
        return np.random.default_rng([self.seed, client])

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[c] for c in range(*client.indices(self.num_clients))]
        return int(self.draw(int(client)).integers(self.low, self.high + 1))


class SampledPopulation(Sequence):
    """An artificial population, for federations of more clients than the data can be split among (as
    pfl-research builds them): client c holds a size drawn uniformly from [low, high] and that many distinct rows
    drawn uniformly from the training set's, both from the seed and c alone and computed when asked, so a
    population of millions costs the memory of the clients in the round. Clients may share rows; none is
    missing more than chance leaves out."""

    def __init__(self, num_rows: int, num_clients: int, low: int, high: int, seed: int):
        if high > num_rows:
            raise DataError(f"config key 'data.client_examples': clients of up to {high} examples, but the training "
                            f"set has {num_rows}")
        self.num_rows = num_rows
        self.sizes = PopulationSizes(num_clients, low, high, seed)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[c] for c in range(*client.indices(len(self)))]
        draw = self.sizes.draw(int(client))
        size = int(draw.integers(self.sizes.low, self.sizes.high + 1))
        return np.sort(draw.choice(self.num_rows, size, replace=False))
