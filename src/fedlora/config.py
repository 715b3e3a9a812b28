"""Experiment configuration: TOML file -> validated, typed settings.

Every section rejects unknown keys; every error names the dotted key at fault.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import annotated_types

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


def _none_value(cls, value):
    """TOML has no null: "none" (or "") sets a key back to its default of None, e.g. --set privacy.epsilon=none."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value


def _integer_or_auto(cls, value):
    """A field that takes an integer or "auto": any other string is refused with that message."""
    if isinstance(value, str) and value != "auto":
        raise ValueError("should be an integer >= 1 or 'auto'")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(Section):
    """The federated method: which adapter factors clients train and send, and how the server combines them
    (docs/methods.md)."""
    name: str = Field("fedsb", description="fedit, ffa, fedsb, fedex, flora, fedsa, full, fedsvd, rolora, flexlora, "
                                           "hetlora, or a method added with fedlora.register_method")


class ModelConfig(Section):
    """The base model: a preset, a Hugging Face hub id or a local folder, and how its weights are held."""
    name: str = Field("minilm-l6", description="preset name or Hugging Face hub id")
    path: str | None = Field(None, description="local model folder; takes precedence over name")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the weights' dtype")
    autocast: Literal["off", "bfloat16", "float16"] = Field(
        "off", description="mixed precision for forward passes (bfloat16 on recent GPUs and CPUs)")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="what a classifier's head reads: the first token (cls: the model as it is) or the "
                           "attention-masked mean of the last hidden states (mean: how sentence encoders such "
                           "as all-MiniLM-L6-v2 were trained)")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="load the frozen base quantised by bitsandbytes (4bit: NF4, bfloat16 compute; 8bit: "
                            "LLM.int8) on a CUDA device, adapters in float32; needs pip install 'fedlora[quant]'")


class AdapterConfig(Section):
    """The low-rank adapters (LoRA) added to the model's linear layers."""
    rank: int = Field(8, gt=0, description="rank r of every adapter")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator, s = alpha / rank; default: rank (s = 1; "
                                                           "Fed-SB always uses s = 1)")
    target_modules: list[str] | None = Field(
        None, description="module-name suffixes of the adapted layers; default by architecture (BERT, RoBERTa: "
                          "query, key, value, dense; Llama, Mistral, Qwen2, Gemma 3: the q, k, v, o, gate, up and "
                          "down projections; GPT-2: c_attn, c_proj, c_fc)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input during training")
    modules_to_save: list[str] | None = Field(
        None, description="task-head modules trained by every method; default: the model's classifier head")
    client_ranks: list[Annotated[int, annotated_types.Ge(1)]] | None = Field(
        None, description="one rank per client (each at most adapter.rank, the global rank): client i trains, "
                          "sends and receives only the first client_ranks[i] components (fedit, ffa, flora, "
                          "flexlora, hetlora)")


class DataConfig(Section):
    """The training and evaluation data (a preset or files; docs/data-and-models.md) and how the training data
    is split among the clients."""
    name: str | None = Field(
        "sst2", description="preset: sst2, rte, imdb (classification); gsm8k, commonsense, arithmetic "
                            "(instructions for causal LMs); \"none\" for plain files (data.path)")
    kind: Literal["auto", "classification", "instructions"] = Field(
        "auto", description="what the files hold; auto: from the preset, else from the model preset's task")
    chat_template: bool | None = Field(
        None, description="instructions: wrap prompts in the tokenizer's chat template (default: if it has one)")
    root: str | None = Field(None, description="folder holding the preset folders; else $FEDLORA_DATA_DIR")
    source: Literal["auto", "local", "hub"] = Field(
        "auto", description="where a preset is read from: auto: the folder under data.root when there is one, "
                            "else the Hugging Face hub")
    path: str | None = Field(None, description="training file (TSV/CSV/JSONL/JSON)")
    eval_path: str | None = Field(None, description="evaluation file")
    eval_split: str | None = Field(None, description="preset split used for evaluation (default: the dev split)")
    hub_id: str | None = Field(None, description="a Hugging Face data set id to read (its train split and "
                                                "data.eval_split, default validation) when there is no preset or path")
    header: bool = Field(True, description="CSV/TSV files start with a header row; false: columns are "
                                          "named by their 0-based index in text_columns and label_column")
    text_columns: list[Annotated[int, annotated_types.Ge(0)] | str] | None = Field(
        None, min_length=1, max_length=2, description="one or two text columns (0-based indices without a header)")
    label_column: Annotated[int, annotated_types.Ge(0)] | str | None = Field(
        None, description="the label column (a 0-based index without a header); its values, names or integers, "
                          "become class ids 0..k-1 in sorted order")
    max_length: int = Field(128, gt=0, description="token limit of an example (longer texts are truncated); "
                                                   "refused below the special tokens plus one token per text, or "
                                                   "above the model's limit")
    max_train_examples: int | None = Field(None, gt=0, description="train on a fixed random subset of this "
                                                                   "many training examples; default: all")
    holdout_fraction: float | None = Field(
        None, gt=0, le=0.5, description="evaluate on this fraction of the training data, held out from training "
                                        "(a fixed draw), instead of the evaluation split: tune without the test set")
    tasks: list[str] | None = Field(
        None, min_length=1, description="instruction data: only these source tasks (e.g. [\"boolq\", \"piqa\"]), "
                                        "in training and evaluation; default: all")
    partition: Literal["iid", "dirichlet", "label_proportion", "task", "sampled"] = Field(
        "iid", description="how the training examples are split among the clients: iid (at random, equal sizes), "
                           "dirichlet (label shares per client drawn with dirichlet_alpha; for instructions it "
                           "mixes the source tasks), label_proportion (label_proportions), task (every client holds "
                           "one label, or for instructions one source task), sampled (an artificial population of "
                           "any size: each client draws client_examples rows from the training set, computed when "
                           "it is sampled)")
    dirichlet_alpha: float = Field(0.5, gt=0, description="partition = dirichlet: smaller is more skewed")
    label_proportions: list[list[float]] | None = Field(
        None, description="partition = label_proportion: one row of label shares per client, e.g. "
                          "[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]] for three clients")
    min_client_examples: int = Field(2, ge=1, description="fewest training examples a client may hold")
    client_examples: list[Annotated[int, annotated_types.Ge(1)]] | None = Field(
        None, min_length=2, max_length=2, description="partition = sampled: [fewest, most] examples of a client, its size drawn uniformly "
                          "between them")
    client_paths: list[str] | None = Field(
        None, min_length=1, description="one training file per client (client i trains on all of file i): a "
                                        "natural partition, as the parties of a deployment hold their data; "
                                        "replaces data.path and the partition settings")
    client_eval_paths: list[str] | None = Field(
        None, min_length=1, description="with client_paths: one evaluation file per client, on which each "
                                        "client evaluates the model it uses (federated evaluation; \"\" for a "
                                        "client without one)")

    @field_validator("name")
    @classmethod
    def _no_preset(cls, name):  # TOML has no null: "none" or "" mean plain files
        return None if name is None or name.lower() in ("", "none") else name

    @model_validator(mode="after")
    def _population(self):
        if self.partition == "sampled" and self.client_examples is None:
            raise ValueError("data.client_examples is required when data.partition = 'sampled'")
        if self.partition != "sampled" and self.client_examples is not None:
            raise ValueError("data.client_examples applies to data.partition = 'sampled'")
        if self.client_examples is not None and self.client_examples[0] > self.client_examples[1]:
            raise ValueError(f"data.client_examples = {list(self.client_examples)}: the fewest is above the most")
        return self

    @model_validator(mode="after")
    def _client_files(self):
        if self.client_eval_paths is not None and self.client_paths is None:
            raise ValueError("data.client_eval_paths needs data.client_paths (one training file per client)")
        if self.client_paths is None:
            return self
        if self.client_eval_paths is not None and len(self.client_eval_paths) != len(self.client_paths):
            raise ValueError(f"data.client_eval_paths has {len(self.client_eval_paths)} files but "
                             f"data.client_paths has {len(self.client_paths)}: give one per client")
        if not all(self.client_paths):
            raise ValueError("data.client_paths: every client needs a training file (an empty path is given)")
        for key in ("path", "hub_id", "holdout_fraction", "max_train_examples", "eval_split", "partition",
                    "dirichlet_alpha", "label_proportions", "client_examples", "min_client_examples"):
            if key in changed_keys(self):
                raise ValueError(f"data.client_paths and data.{key} cannot be given together: client i trains on "
                                 f"all of data.client_paths[i] (data.{key} applies to one shared file)")
        return self

    @model_validator(mode="after")
    def _partition_settings(self):
        if "dirichlet_alpha" in changed_keys(self) and self.partition != "dirichlet":
            raise ValueError(f"data.dirichlet_alpha = {self.dirichlet_alpha} has no effect with data.partition = "
                             f"'{self.partition}' (it applies to 'dirichlet')")
        return self

    @model_validator(mode="after")
    def _one_evaluation_source(self):
        for key in ("eval_path", "eval_split"):
            if self.holdout_fraction is not None and getattr(self, key):
                raise ValueError(f"data.{key} and data.holdout_fraction both choose the evaluation data "
                                 "(held-out training rows replace the evaluation split): keep one")
        return self

    @model_validator(mode="after")
    def _column_kinds(self):
        columns = {"text_columns": self.text_columns or [], "label_column": [self.label_column]}
        for key, values in columns.items():
            numbers = [v for v in values if isinstance(v, int)]
            names = [v for v in values if isinstance(v, str)]
            if self.header and numbers:
                raise ValueError(f"data.{key}: column numbers ({numbers[0]}) need data.header = false; "
                                 f"with a header row, name the column")
            if not self.header and names:
                raise ValueError(f"data.{key}: with data.header = false columns are 0-based numbers, "
                                 f"got {names[0]!r}")
        return self


class FederationConfig(Section):
    """The clients, the rounds, and what the server does when clients fail to answer."""
    num_clients: int = Field(10, gt=0, description="clients, each holding its share of the training data")
    clients_per_round: int = Field(10, gt=0, description="clients drawn at random to train in each round")
    rounds: int = Field(10, ge=0, description="training rounds after the set-up (round 0)")
    weighting: Literal["auto", "examples", "uniform"] = Field(
        "auto", description="the weight of a client's update: by its number of examples, or equal; auto: by its "
                            "examples, equal under privacy.unit = 'client' (whose bound on a client's influence "
                            "needs equal weights)")
    min_clients: int = Field(1, gt=0, description="fewest answering clients a round may aggregate")
    client_timeout: float | None = Field(
        None, gt=0, description="seconds a client may train in a round before it is dropped")
    on_too_few_clients: Literal["stop", "retry"] = Field(
        "stop", description="when fewer than min_clients answer: stop the run (keeping what it finished) or "
                            "run the round again")
    round_retries: int = Field(2, ge=0, description="how often a round is run again under 'retry'")
    parallel_clients: Annotated[int, annotated_types.Ge(1)] | Literal["auto"] = Field(
        "auto", description="clients trained together in one pass over the shared base model (1: one after "
                            "another); auto: as many as memory allows wherever that gives the sequential result "
                            "(docs/performance.md)")

    _integer_or_auto = field_validator("parallel_clients", mode="before")(_integer_or_auto)

    @model_validator(mode="after")
    def _clients(self):
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be at most num_clients ({self.num_clients})")
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min_clients ({self.min_clients}) must be at most clients_per_round ({self.clients_per_round})")
        return self


def changed_keys(section: BaseModel) -> set[str]:
    """The keys a section was given away from their defaults (a full dump holds every key, at its default or
    not, so being given is not enough)."""
    return {k for k in section.model_fields_set if getattr(section, k) != type(section).model_fields[k].default}


class ServerConfig(Section):
    """What the server checks and how it combines the updates it accepts."""
    max_update_norm: Annotated[float, annotated_types.Gt(0)] | Literal["auto", "off"] | None = Field(
        "auto", description="reject an update whose L2 distance from what the client started with is larger than "
                            "this; auto: than norm_factor x the round's median (3+ updates) or than local training "
                            "can reach; off: no size check")
    norm_factor: float = Field(10.0, gt=1, description="max_update_norm = 'auto': the factor over the round's median")
    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="weighted mean (exact), or a robust coordinate-wise weighted median / trimmed mean "
                            "(not exact; for the methods whose rule is a weighted sum)")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: weight cut from each end")


class TrainConfig(Section):
    """Each client's local training in a round."""
    local_steps: int = Field(10, gt=0, description="optimizer steps per client per round")
    batch_size: int = Field(16, gt=0, description="the expected (logical) batch: under DP each step is a Poisson "
                                                  "draw with rate batch_size / n (n: the client's examples), "
                                                  "without DP a draw of this many examples")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd takes train.momentum")
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay")
    momentum: float = Field(0.0, ge=0, lt=1, description="optimizer = sgd: momentum")
    max_grad_norm: float | None = Field(None, gt=0, description="without DP: clip each step's gradient to this "
                                                                "L2 norm (DP clips per example: privacy.clip_norm)")
    keep_optimizer_state: bool = Field(False, description="carry each client's optimizer state across rounds")
    physical_batch_size: Annotated[int, annotated_types.Ge(1)] | Literal["auto"] = Field(
        "auto", description="most rows in one forward/backward: a batch is cut into micro-batches of similar "
                            "lengths whose gradients add up to the batch's (under DP the clipped per-example "
                            "gradients of all micro-batches are summed before the one noise draw); auto: the rows "
                            "whose activations fit in half the free memory")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="linear or cosine decay to 0 over the run's rounds * local_steps steps; local "
                                "step t of round r is step (r - 1) * local_steps + t whether or not the client took "
                                "part before, so a resumed run steps at the rates of an uninterrupted one")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 (counted over the whole run)")

    _integer_or_auto = field_validator("physical_batch_size", mode="before")(_integer_or_auto)

    @model_validator(mode="after")
    def _optimizer_settings(self):
        if "momentum" in changed_keys(self) and self.optimizer != "sgd":
            raise ValueError(f"train.momentum = {self.momentum} has no effect with train.optimizer = "
                             f"'{self.optimizer}' (it applies to 'sgd')")
        return self


class EvalConfig(Section):
    """Evaluation of the global model on the evaluation data (always after the last round)."""
    every: int = Field(1, ge=0, description="evaluate every N rounds (0: only at the end)")
    batch_size: int = Field(64, gt=0, description="examples per evaluation forward pass")
    max_examples: int | None = Field(
        None, gt=0, description="evaluate on a fixed random sample of this size (classification: stratified by "
                                "label); instructions: taken round-robin over the tasks")
    choice_mode: Literal["score", "generate", "both"] = Field(
        "score", description="multiple-choice instructions: option log-likelihood, generation + answer "
                             "extraction, or both (free-form answers are always generated)")
    max_new_tokens: int = Field(256, gt=0, description="greedy generation length limit")


EXAMPLE_LEVEL_KEYS = {"clip_norm", "grad_norm"}
CLIENT_LEVEL_KEYS = {"client_clip", "clipping", "target_quantile", "clip_learning_rate", "count_stddev",
                     "mechanism", "modulus_bits", "min_survivors"}
DISTRIBUTED_KEYS = {"modulus_bits", "min_survivors"}


class PrivacyConfig(Section):
    """Differential privacy: of one training example (unit = 'example': DP-SGD on every client) or of everything
    one client contributes over the run (unit = 'client': DP-FedAvg, the server noising the sum of the clipped
    updates; docs/privacy.md). Enabled by giving epsilon (noise calibrated for the planned steps or rounds) or
    noise_multiplier (epsilon reported), or both (the run must fit the target)."""
    unit: Literal["example", "client"] = Field(
        "example", description="what is protected: one training example of a client (DP-SGD on every client), or "
                               "one client, all its data over all rounds (client-level DP-FedAvg: each sampled "
                               "client's update clipped to client_clip, Gaussian noise added by the server)")
    epsilon: float | None = Field(None, gt=0, description="the target epsilon (per client under unit = 'example'); "
                                                          "the noise is calibrated to reach it after the planned "
                                                          "steps or rounds; \"none\": no DP (as --set "
                                                          "privacy.epsilon=none)")
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1e-5, or 1/(10 n) for a client of n > 10^4 "
                                                              "examples (unit = 'client': for n > 10^4 clients)")
    clip_norm: float = Field(1.0, gt=0, description="unit = 'example': C, every example's gradient is clipped to "
                                                    "this L2 norm")
    noise_multiplier: float | None = Field(None, gt=0, description="sigma: the noise's standard deviation over "
                                                                   "the clipping bound; default: calibrated to epsilon")
    client_clip: float = Field(0.1, gt=0, description="unit = 'client': S, the L2 bound on a client's update (its "
                                                      "upload minus what it received); with adaptive clipping, "
                                                      "its starting value")
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed", description="unit = 'client': S stays client_clip, or follows the target_quantile of the "
                             "clients' update norms (Andrew et al. 2021: a noised count of the clients within S)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive clipping: the quantile of the update "
                                                                "norms that S tracks")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive clipping: eta in S <- S exp(-eta (b - "
                                                             "target_quantile)), b the noised fraction within S")
    count_stddev: float | None = Field(None, gt=0, description="adaptive clipping: the std of the noise on the "
                                                               "count of clients within S; default: the expected "
                                                               "cohort / 20")
    mechanism: Literal["central", "distributed"] = Field(
        "central", description="unit = 'client': who adds the noise: the server, to the sum of the clipped updates "
                               "(central), or every client, its share of it in the integers that secure "
                               "aggregation sums, so that only the noised sum is ever unmasked (distributed: the "
                               "distributed Skellam mechanism, each update rotated and rounded to integers)")
    modulus_bits: int = Field(32, ge=8, le=48, description="mechanism = 'distributed': the sum is taken mod "
                                                           "2^modulus_bits (32: Flower SecAgg+'s modulus); the "
                                                           "rounding is the finest that keeps a wrap-around of the "
                                                           "sum below 1e-6 a round")
    min_survivors: float = Field(0.8, gt=0, le=1, description="mechanism = 'distributed': a fraction of the "
                                                              "expected cohort (clients_per_round): n = ceil(this x "
                                                              "clients_per_round) clients' noise shares together "
                                                              "make the planned noise, each adding 1/n of its "
                                                              "variance; a round with fewer survivors is not released")
    accountant: Literal["auto", "rdp", "prv"] = Field(
        "auto", description="auto: the smaller of Opacus' RDP and PRV bounds (both are valid upper bounds; PRV's "
                            "is the upper end of its error interval), the noise calibrated against it; where RDP "
                            "gives epsilon > 100 auto reports RDP's (PRV's discretisation grows without bound)")
    randomness: Literal["secret", "seeded"] = Field(
        "secret", description="secret: every noise generator and Poisson draw seeded from the OS's CSPRNG afresh "
                              "each round, so nothing in the config lets the server regenerate a client's noise (two "
                              "runs differ; a resumed run draws fresh noise); seeded: from the seed, for "
                              "bit-identical, resumable simulations only (refused on Flower)")
    grad_norm: Literal["auto", "ghost", "materialise"] = Field(
        "auto", description="per-example norms from materialised gradients or by the ghost-norm identity")

    _none = field_validator("epsilon", "noise_multiplier", mode="before")(_none_value)

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None

    @property
    def per_example(self) -> bool:
        """DP-SGD on every client."""
        return self.enabled and self.unit == "example"

    @property
    def per_client(self) -> bool:
        """Client-level DP: the server noises the sum of the clipped updates."""
        return self.enabled and self.unit == "client"

    @property
    def distributed(self) -> bool:
        """Distributed client-level DP: the clients noise their updates, the server sees only their secure sum."""
        return self.per_client and self.mechanism == "distributed"

    @model_validator(mode="after")
    def _unit_settings(self):
        # a key of the other unit away from its default would be ignored: refused (a full dump holds every key)
        changed = changed_keys(self)
        if self.mechanism != "central" and self.unit != "client":
            raise ValueError(f"privacy.mechanism = '{self.mechanism}' applies to privacy.unit = 'client', not to "
                             f"privacy.unit = '{self.unit}'")
        other = (CLIENT_LEVEL_KEYS if self.unit == "example" else EXAMPLE_LEVEL_KEYS) & changed
        if other:
            key = sorted(other)[0]
            raise ValueError(f"{key} applies to privacy.unit = '{'client' if self.unit == 'example' else 'example'}',"
                             f" not to privacy.unit = '{self.unit}'")
        if not self.enabled and not {"epsilon", "noise_multiplier"} & self.model_fields_set \
                and (changed or self.unit != "example"):
            named = f"privacy.unit = '{self.unit}'" if self.unit != "example" else f"privacy.{sorted(changed)[0]}"
            raise ValueError(f"{named} configures no mechanism: give privacy.epsilon or privacy.noise_multiplier "
                             "(or privacy.epsilon = 'none' for a run without DP)")
        adaptive_keys = {"target_quantile", "clip_learning_rate", "count_stddev"} & changed
        if adaptive_keys and self.clipping != "adaptive":
            raise ValueError(f"{sorted(adaptive_keys)[0]} applies to privacy.clipping = 'adaptive'")
        distributed_keys = DISTRIBUTED_KEYS & changed
        if distributed_keys and self.mechanism != "distributed":
            raise ValueError(f"privacy.{sorted(distributed_keys)[0]} applies to privacy.mechanism = 'distributed'")
        if self.mechanism == "distributed" and self.clipping == "adaptive":
            raise ValueError("privacy.clipping = 'adaptive' is not available with privacy.mechanism = 'distributed': "
                             "the count of clients within the bound would need noise of its own; use 'fixed'")
        return self


class HetLoRAConfig(Section):
    """HetLoRA's rank self-pruning (docs/methods.md): the last components of a client's rank are penalised
    and dropped once local training shrinks them."""
    decay: float = Field(0.9, gt=0, le=1, description="gamma: a client of rank r keeps floor(gamma r) components "
                                                      "when it prunes (1: never prune)")
    penalty: float = Field(0.01, ge=0, description="lambda: the weight of the pruning penalty "
                                                   "lambda sum_l ||B_l,tail||_F ||A_l,tail||_F in the local loss")


class FedSBConfig(Section):
    """Fed-SB's set-up before round 1: the shared initialisation of the adapters (docs/methods.md)."""
    init: Literal["sign_sketch", "sketch", "signs", "dense"] = Field(
        "sign_sketch", description="the set-up exchange: a federated randomized SVD of the clients' gradient signs "
                                   "(sign_sketch) or of the summed gradient (sketch), sign votes (signs), or dense "
                                   "gradient sums")
    oversampling: int = Field(8, ge=0, description="sketch columns beyond the rank (k = adapter.rank + oversampling)")
    init_examples: int = Field(128, gt=0, description="examples, over all clients, for the first-step gradient")
    init_data: Literal["clients", "public"] = Field(
        "clients", description="whose data gives the init gradient: the clients' (private under DP) or public_data")
    public_data: DataConfig | None = Field(None, description="a public data set (its train split) for init_data = 'public'")
    init_noise_multiplier: float | None = Field(
        None, gt=0, description="under DP, the noise of the clients' init release (default: privacy's noise multiplier)")
    init_lr: float | None = Field(None, gt=0, description="eta in G = -eta sign(grad); default (or \"none\") the "
                                     "reference's rule: train.lr / (federation.clients_per_round x train.warmup_steps), "
                                     "without warmup train.lr / (federation.clients_per_round x "
                                     "federation.rounds x train.local_steps)")
    svd_niter: int = Field(4, ge=4, description="power iterations of the randomized SVD")

    _none = field_validator("init_lr", mode="before")(_none_value)  # "none": the reference's rule


class Config(Section):
    seed: int = Field(0, ge=0, description="every random draw (partition, client sampling, initialisation, "
                                           "batches, dropout) derives from it")
    device: str = Field("auto", description="cpu, cuda, cuda:1, ...; auto: cuda when a GPU is there, else cpu")
    method: MethodConfig = MethodConfig()
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    fedsb: FedSBConfig = FedSBConfig()
    hetlora: HetLoRAConfig = HetLoRAConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.adapter.client_ranks is not None:
            self._check_client_ranks()
        if self.fedsb.init_data == "public" and self.fedsb.public_data is None:
            raise ValueError("fedsb.public_data is required when fedsb.init_data = 'public'")
        if self.privacy.per_client:
            self._check_client_level()
        d = self.data
        if d.client_paths is not None and len(d.client_paths) != self.federation.num_clients:
            raise ValueError(f"data.client_paths has {len(d.client_paths)} files but federation.num_clients is "
                             f"{self.federation.num_clients}: give one training file per client")
        if d.partition == "label_proportion":
            if d.label_proportions is None:
                raise ValueError("data.label_proportions is required when data.partition = 'label_proportion'")
            if len(d.label_proportions) != self.federation.num_clients:
                raise ValueError(
                    f"data.label_proportions has {len(d.label_proportions)} rows but "
                    f"federation.num_clients is {self.federation.num_clients}: give one row per client")
        return self

    def _check_client_level(self) -> None:
        """What client-level DP's sensitivity bound rests on: equal, fixed weights in a plain sum, one rank."""
        if self.federation.weighting == "examples":
            raise ValueError("federation.weighting = 'examples' cannot hold under privacy.unit = 'client': a "
                             "client's weight would reveal its size and scale its influence beyond client_clip; "
                             "client-level DP weights every client alike")
        if self.server.aggregation != "mean":
            raise ValueError(f"server.aggregation = '{self.server.aggregation}' cannot hold under privacy.unit = "
                             "'client': the noise is calibrated to the sum of the clipped updates (use 'mean')")
        if self.adapter.client_ranks is not None:
            raise ValueError("adapter.client_ranks cannot hold under privacy.unit = 'client': every client's update "
                             "must have the global shape to be clipped and summed")

    def _check_client_ranks(self) -> None:
        ranks = self.adapter.client_ranks
        if len(ranks) != self.federation.num_clients:
            raise ValueError(f"adapter.client_ranks has {len(ranks)} ranks but federation.num_clients is "
                             f"{self.federation.num_clients}: give one rank per client")
        if max(ranks) > self.adapter.rank:
            raise ValueError(f"adapter.client_ranks: rank {max(ranks)} is above adapter.rank = {self.adapter.rank}, "
                             "the global rank every client's factors are cut from")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_UNION_TAG = re.compile(r"^(constrained-\w+|literal\[.*\]|int|float|str|bool)$")


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # a union's arm appears in the location as a type tag ("constrained-int", "literal['auto']"): not a key
    key = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.search(str(p)))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key {_shorten(repr(key))}"
    if first["type"] == "model_type":  # pydantic's message names the class, not the TOML table
        msg = "expected a table of settings"
    if key:
        return f"config key {_shorten(repr(key))}: {msg} (got {_shorten(repr(first.get('input')))})"
    return msg


# TOML integers are 64-bit; beyond that no seed or size is meaningful.
_INT64 = range(-2 ** 63, 2 ** 63)


def _check_values(raw: Any, value: Any, key: str) -> None:
    """Reject what validation lets through: a boolean read as a number, inf or nan, integers beyond 64 bits.

    `raw` is the input, `value` the validated value at the same key.
    """
    if isinstance(raw, dict) and isinstance(value, dict):
        for k in raw:
            _check_values(raw[k], value.get(k), f"{key}.{k}" if key else k)
    elif isinstance(raw, list) and isinstance(value, list):
        for i, (r, v) in enumerate(zip(raw, value)):
            _check_values(r, v, f"{key}.{i}")
    elif isinstance(raw, bool) and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r}: expected a number, got a boolean ({str(raw).lower()})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r}: expected a finite number, got {value}")
    elif isinstance(value, int) and value not in _INT64:
        raise ConfigError(f"config key {key!r}: {_shorten(str(value), 30)} is out of range (64-bit integers)")


def build_config(raw: dict[str, Any]) -> Config:
    """A Config from a nested dict of sections; what the method allows is `methods.check_method`'s to check
    (`api.make_config` does both)."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    _check_values(raw, config.model_dump(), "")
    return config


def with_defaults(raw: dict) -> dict:
    """A config recorded as a dict (a checkpoint's, written by this or another version) with every key this
    version has and the record lacks at its default, and without the keys this version lacks that the record
    leaves unset: so that a key added since, or in a later version, is no difference. As recorded if it does not
    validate."""
    try:
        return build_config(_known_or_set(raw, Config)).to_dict()
    except ConfigError:
        return dict(raw)


def _known_or_set(raw: dict, section: type[BaseModel]) -> dict:
    kept = {}
    for key, value in raw.items():
        field = section.model_fields.get(key)
        inner = _section_class(field.annotation) if field is not None else None
        if field is None and value is None:
            continue
        kept[key] = _known_or_set(value, inner) if inner is not None and isinstance(value, dict) else value
    return kept


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += differing_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(prefix + k)
    return keys


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=0.1' -> (['train', 'lr'], 0.1); values are parsed as TOML, else kept as strings."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {_shorten(repr(item))}")
    key, text = item.split("=", 1)
    keys = [k.strip() for k in key.split(".")]
    if not all(keys):
        raise ConfigError(f"--set {_shorten(repr(item))}: empty key name in {key.strip()!r}")
    try:
        parsed = tomllib.loads(f"v = {text}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return keys, text
    # text such as "1\nseed = 2" parses to more than one key: it is not a single value
    return keys, parsed["v"] if parsed.keys() == {"v"} else text


def toml_value(value: Any) -> str:
    """A value as TOML writes it (what parse_override reads back): strings quoted, booleans lower-case, lists
    of such values."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class in a field's type (`DataConfig | None` -> DataConfig); None for a plain value."""
    for kind in (annotation, *get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node, section = raw, Config
        for depth, k in enumerate(keys[:-1]):
            path = ".".join(keys[:depth + 1])
            if section is not None and k in section.model_fields:
                section = _section_class(section.model_fields[k].annotation)
                if section is None:
                    raise ConfigError(f"--set {_shorten(repr(item))}: {path!r} is a value, not a section")
            else:
                section = None  # an unknown key: validation names it
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {_shorten(repr(item))}: {path!r} is not a section")
        node[keys[-1]] = value
    return raw


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None


_DATA_PATH_KEYS = ("root", "path", "eval_path", "client_paths", "client_eval_paths")
# the keys whose values are file system paths, by section
PATH_KEYS = {("model",): ("path",), ("data",): _DATA_PATH_KEYS, ("fedsb", "public_data"): _DATA_PATH_KEYS}


def map_paths(raw: dict[str, Any], change) -> dict[str, Any]:
    """`raw` (a config as nested dicts, changed in place) with `change` applied to every path it sets."""
    for where, keys in PATH_KEYS.items():
        section = raw
        for name in where:
            section = section.get(name) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue
        for key in keys:
            value = section.get(key)
            if isinstance(value, str) and value:
                section[key] = change(value)
            elif isinstance(value, list):
                section[key] = [change(v) if isinstance(v, str) and v else v for v in value]
    return raw


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's settings, with its relative paths resolved against the file's folder (as Cargo and
    pyproject do), so a config works from any working folder; `--set` values stay relative to the working
    folder."""
    folder = path.parent
    return map_paths(_read_toml(path), lambda value: os.path.normpath(folder / Path(value).expanduser()))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw = read_config_file(Path(path)) if path is not None else {}
    return build_config(apply_overrides(raw, overrides or []))
