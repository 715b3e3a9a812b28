"""The ClientApp: one fedlora client on a SuperNode. Its client id comes from the node config (`partition-id`,
checked against `num-partitions`); its training data is all of the node's own file (`data-path` in the node
config, else the config's data.client_paths[id]), or the shard the simulator's partition gives that client of
the config's shared file; its evaluation data, the node's own `eval-path` (else data.client_eval_paths[id]).
It trains with the simulator's own client update (local_train, DP-SGD included), evaluates with the server's
own routine (federation.evaluate_model), and keeps what a client keeps between rounds (its copy of the global
state, FedSA-LoRA's own B, W0 changed by FedEx-LoRA or FLoRA) in Flower's `context.state`. The model is loaded
once per process and reused by every message that process answers.

FEDLORA_FLOWER_FAULT=raise@R (or hang@R, several comma-separated) makes the node fail (or hang) at round R:
for tests of dropped clients.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..client import ClientTrainer
from ..data.presets import load_own_training_file, read_split
from ..errors import ConfigError, FedloraError
from ..experiment import build_task, load_task_data, task_kind
from ..federation import client_model, evaluate_model
from ..methods import Request, check_method
from ..models import pick_device
from ..plan import FederationPlan, PrivacySettings, client_shards, shard_sizes
from ..tasks import ClassificationTask
from ..seeding import generator
from .project import from_run_config
from .records import flatten, from_record, keep_for_audit, nest, privacy_from, to_record
from .strategy import check_supported

METHOD_STATE, BASE_WEIGHTS, OWN_STATE = "fedlora.method", "fedlora.base", "fedlora.own"


class ClientRuntime:
    """A client's model, data and method object, loaded once per process and configuration."""

    def __init__(self, run_config: dict, data_path: str | None = None, eval_path: str | None = None,
                 client: int = 0):
        """`data_path`, `eval_path`: the node's own files (node config data-path, eval-path); without them,
        client `client`'s files of data.client_paths and data.client_eval_paths when the config gives them."""
        cfg = from_run_config(run_config)
        check_supported(cfg, server=False)
        d = cfg.data
        if not data_path and d.client_paths:
            data_path = d.client_paths[client]
            eval_path = eval_path or (d.client_eval_paths[client] if d.client_eval_paths else None)
        self.data_path, self.eval_path = data_path, eval_path
        kind = task_kind(d, cfg.model.name)
        data = None
        if data_path:  # all of this node's own file; the config's partition is for the shared file
            data = (load_own_training_file(d, data_path, "node config data-path") if kind == "classification"
                    else load_task_data(d.model_copy(update={"path": data_path}), kind))
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        task, adapted, _ = build_task(cfg, device, data=data)
        if data_path:  # the node's plan holds its own size (the server sends what depends on the others')
            n = len(task.train_labels)
            shards = [np.arange(n)] * cfg.federation.num_clients
        else:
            shards = client_shards(cfg, task)
        plan = FederationPlan(cfg, shard_sizes(shards))
        method = check_method(cfg)(adapted, cfg, plan.client_sizes)
        # the noise multiplier of the config's partition; each message under DP brings the server's (take_privacy)
        self.own_sigma = plan.noise_multiplier() if cfg.privacy.per_example else None
        self.trainer = ClientTrainer(cfg, task, adapted, method, plan, shards)
        self.mechanism_plan = None  # distributed DP's, made at the first round (distributed_plan)
        method.global_state = method.seed_state(generator(cfg.seed, "init"))
        self.initial_state = flatten(method.state_dict())  # before the first message: what the seed gives
        self.pristine_base = adapted.base_weights() if method.changes_base else None
        self.privacy_checked: tuple | None = None  # the last DP settings a server sent that passed the check
        self.eval_task, self.eval_error = None, ""  # this node's evaluation data, or why it has none
        if eval_path:  # a bad file costs this node its evaluation, not its training
            try:
                if not isinstance(task, ClassificationTask):
                    raise ConfigError("evaluation on a node's own file needs classification data")
                self.eval_task = task.evaluating_on(read_split(d, eval_path, "node config eval-path",
                                                               task.data.label_names))
            except FedloraError as err:  # one line that names the file
                why = str(err).splitlines()[0]
                self.eval_error = why if eval_path in why else f"eval-path {eval_path}: {why}"

    def evaluation_examples(self) -> int:
        """The examples this node evaluates on (0: it evaluates nothing)."""
        task = self.eval_task
        return len(task.eval_indices(self.trainer.cfg.eval.max_examples)) if task is not None else 0

    def evaluate(self, client: int, global_state: dict) -> dict:
        """Federated evaluation: the model this client uses (the global model sent, with FedSA-LoRA's own B
        over it) on the node's evaluation data, with the server's own routine; Flower's "num-examples" key."""
        if self.eval_task is None:
            raise ConfigError(self.eval_error or "this node has no evaluation data (node config eval-path)")
        trainer = self.trainer
        metrics = evaluate_model(self.eval_task, trainer.adapted,
                                 client_model(trainer.method, trainer.own_states.get(client), global_state),
                                 trainer.cfg.eval)
        return {"num-examples": int(metrics.pop("examples"))} | {k: float(v) for k, v in metrics.items()}

    def take_privacy(self, client: int, settings) -> PrivacySettings | None:
        """What this client trains with: under DP the noise multiplier, delta and set-up examples the server
        sends with a message (it calibrates them from every node's size), checked against this client's own plan
        before they are used; a message without them, this client's own plan's."""
        plan = self.trainer.plan
        privacy = privacy_from(settings)
        if privacy is None:
            return None if self.own_sigma is None else plan.privacy(client, self.own_sigma, plan.delta())
        if (client, privacy) != self.privacy_checked:  # the accountant takes seconds: once a run
            plan.check_client_privacy(client, privacy)
            self.privacy_checked = (client, privacy)
        return privacy

    def take_clip(self, settings) -> float | None:
        """Under client-level DP, the bound the server asks this client to clip its update to (a message
        without one is refused: the server's noise assumes it)."""
        if not self.trainer.cfg.privacy.per_client:
            return None
        if "client-clip" not in settings:
            raise ConfigError("privacy.unit = 'client': the server sent no clipping bound (client-clip) with the "
                              "round; this client does not train unclipped")
        return float(settings["client-clip"])

    def distributed_plan(self, context: Context, secure_settings, clip: float | None):
        """Under distributed DP, this client's own plan (from its config and its update's size, as the server's),
        after checking that the round is what the plan needs: an integer SecAgg+ round at its modulus, whose
        threshold lets no sum of fewer than n_min clients be unmasked, and the plan's clipping bound. None
        under any other mechanism."""
        cfg = self.trainer.cfg
        if not cfg.privacy.distributed:
            return None
        from ..privacy.distributed import distributed_plan, update_dimension
        from .secure import INTEGER_BITS, masked_collect_stage, round_threshold

        if self.mechanism_plan is None:
            self.mechanism_plan = distributed_plan(cfg, update_dimension(self.trainer.method))
        plan = self.mechanism_plan
        if secure_settings is None or INTEGER_BITS not in secure_settings or not masked_collect_stage():
            raise ConfigError("privacy.mechanism = 'distributed': the server asked for an update outside SecAgg+'s "
                              "integer sum; this client sends only its noised integers into the secure sum")
        r, sealed = int(secure_settings["round"]), sealed_round(context)
        if r <= sealed:  # a round asked again would give the server another noised copy of the same update
            raise ConfigError(f"privacy.mechanism = 'distributed': round {r} was asked for after this client "
                              f"sealed round {sealed}; each round's update is sealed once")
        if int(secure_settings[INTEGER_BITS]) != plan.bits:
            raise ConfigError(f"privacy.mechanism = 'distributed': the round sums mod 2^{secure_settings[INTEGER_BITS]},"
                              f" this client's plan mod 2^{plan.bits} (privacy.modulus_bits)")
        if round_threshold(context) < plan.min_survivors:
            raise ConfigError(f"privacy.mechanism = 'distributed': SecAgg+'s threshold {round_threshold(context)} "
                              f"would let the server unmask a sum of fewer than the {plan.min_survivors} clients "
                              "whose noise shares make the planned noise (privacy.min_survivors)")
        if clip != plan.clip:
            raise ConfigError(f"privacy.mechanism = 'distributed': the server asked for clipping bound {clip}, this "
                              f"client's plan has privacy.client_clip = {plan.clip}")
        return plan

    def _own_state_folder(self, context: Context) -> Path | None:
        folder = context.node_config.get("state-dir")
        if not folder:
            return None
        run = hashlib.sha256(self.trainer.cfg.model_dump_json().encode()).hexdigest()[:16]  # one folder a config
        return Path(folder) / run

    def save_own_state(self, context: Context, client: int, r: int) -> None:
        """What this client keeps that the server never sees (FedSA-LoRA's own B), written after round r to the
        node's `state-dir` for a resumed run to find; the last two rounds' are kept (a crash during round r + 1
        resumes from round r)."""
        folder, own = self._own_state_folder(context), self.trainer.own_states.get(client)
        if folder is None or not own:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in own.items()},
                  folder / f"client{client}.round{r}.safetensors")
        saved = sorted(folder.glob(f"client{client}.round*.safetensors"),
                       key=lambda f: int(f.stem.rpartition("round")[2]))
        for old in saved[:-2]:
            old.unlink()

    def load_own_state(self, context: Context, client: int, r: int) -> None:
        """A resumed run: this client's own state as it was after round r, the last it trained in."""
        folder = self._own_state_folder(context)
        path = folder / f"client{client}.round{r}.safetensors" if folder else None
        if path is None or not path.is_file():
            raise ConfigError(f"client {client}: its own state after round {r} is not in this node's state-dir "
                              f"({folder}); a resumed run needs the folder the stopped run wrote")
        self.trainer.own_states[client] = load_file(path, device=str(self.trainer.device))

    def restore(self, context: Context, client: int) -> None:
        """This client's state as the last message it answered left it."""
        method, state = self.trainer.method, context.state
        kept = from_record(state[METHOD_STATE], self.trainer.device) if METHOD_STATE in state else self.initial_state
        method.load_state_dict(nest(kept))
        self.trainer.own_states = {client: from_record(state[OWN_STATE], self.trainer.device)} \
            if OWN_STATE in state else {}
        if method.changes_base:
            base = state[BASE_WEIGHTS] if BASE_WEIGHTS in state else None
            self.trainer.adapted.load_base_weights(from_record(base, self.trainer.device) if base else self.pristine_base)

    def keep(self, context: Context, client: int) -> None:
        context.state[METHOD_STATE] = to_record(flatten(self.trainer.method.state_dict()))
        if client in self.trainer.own_states:
            context.state[OWN_STATE] = to_record(self.trainer.own_states[client])
        if self.trainer.method.changes_base:
            context.state[BASE_WEIGHTS] = to_record(self.trainer.adapted.base_weights())


_runtimes: dict[str, ClientRuntime] = {}


def _runtime(context: Context, run_config: dict) -> ClientRuntime:
    node = context.node_config
    data_path, eval_path = node.get("data-path"), node.get("eval-path")
    client = _client_id(context, run_config)
    key = json.dumps([run_config, data_path, eval_path, client], sort_keys=True)
    if key not in _runtimes:
        _runtimes.clear()  # one model per process
        _runtimes[key] = ClientRuntime(run_config, str(data_path) if data_path else None,
                                       str(eval_path) if eval_path else None, client)
    return _runtimes[key]


def _client_id(context: Context, run_config: dict) -> int:
    """This node's fedlora client: its partition-id, checked against the run's federation."""
    node = context.node_config
    num_clients = from_run_config(run_config).federation.num_clients
    if "partition-id" not in node:
        raise ConfigError("node config: partition-id is missing (flower-supernode --node-config "
                          "'partition-id=0 num-partitions=N')")
    client = int(node["partition-id"])
    partitions = int(node.get("num-partitions", num_clients))
    if partitions != num_clients or not 0 <= client < num_clients:
        raise ConfigError(f"node config: partition-id {client} of num-partitions {partitions} does not fit "
                          f"federation.num_clients = {num_clients}")
    return client


SEALED = "fedlora.sealed"  # in a node's context.state under distributed DP: the last round it sealed


def sealed_round(context: Context) -> int:
    """The last round this node sealed in this run (its context.state outlives the ClientApp's processes)."""
    return int(context.state.config_records[SEALED]["round"]) if SEALED in context.state.config_records else 0


def _inject_fault(r: int) -> None:
    for fault in filter(None, os.environ.get("FEDLORA_FLOWER_FAULT", "").split(",")):
        mode, _, at = fault.partition("@")
        if int(at) != r:
            continue
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault at round {r}")


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """The messages of a SecAgg+ round go to secure.secagg_mod (imported only then: every message starts a
    process): Flower's secaggplus_mod, which for an integer round masks the node's integers as they are;
    every other message passes untouched."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from .secure import secagg_mod

        return secagg_mod(msg, context, call_next)
    return call_next(msg, context)


def set_up_reply(runtime, context: Context, client: int, request: dict, arrays: dict,
                 privacy: PrivacySettings | None, settings) -> dict:
    """This client's reply to a phase of the method's set-up exchange (methods.Request.settings() and the
    request's arrays); `settings`, the message's, carry its set-up examples (the server's plan, from every
    node's size)."""
    trainer = runtime.trainer
    if "init-examples" in settings and client in trainer.plan.init_examples:
        trainer.plan.init_examples[client] = int(settings["init-examples"])
    runtime.restore(context, client)
    trainer.adapted.load_state(trainer.method.global_state)  # the gradient is taken through the seed's head
    return trainer.set_up_reply(client, Request(expected={}, arrays=arrays, **request), privacy)


def client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp; `defaults` stand in for run-config entries the run does not give (run_simulation has none)."""
    app = ClientApp(mods=[secure_mod])  # Flower's SecAgg+ for the rounds the server runs with it

    def settings(context: Context) -> dict:
        return (defaults or {}) | dict(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client = _client_id(context, settings(context))
        phase = msg.content["config"]["phase"]
        if phase == "hello":  # which client this node is, and the size of the data it trains on
            runtime = _runtime(context, settings(context))
            labels = getattr(runtime.trainer.task.data, "label_names", None)
            return Message(RecordDict({"config": ConfigRecord({
                "client": client, "examples": len(runtime.trainer.shards[client]),
                "own-data": bool(runtime.data_path), "labels": json.dumps(labels),
                "eval-examples": runtime.evaluation_examples(), "eval-error": runtime.eval_error,
                "keeps-state": bool(context.node_config.get("state-dir"))})}), reply_to=msg)
        if phase == "resync":  # a resumed run: the server's whole state replaces what this node kept
            runtime = _runtime(context, settings(context))
            state = from_record(msg.content["arrays"], runtime.trainer.device)
            parts = {"method": {}, "base": {}}
            for key, tensor in state.items():
                part, _, name = key.partition("/")
                parts[part][name] = tensor
            context.state[METHOD_STATE] = to_record(parts["method"])
            if parts["base"]:
                context.state[BASE_WEIGHTS] = to_record(parts["base"])
            last_trained = int(msg.content["config"].get("last-trained", 0))
            if last_trained:  # the client's own state (FedSA-LoRA's B), which the server never had
                runtime.restore(context, client)
                runtime.load_own_state(context, client, last_trained)
                runtime.keep(context, client)
            return Message(RecordDict({"config": ConfigRecord({"applied": 1})}), reply_to=msg)
        if phase != "set-up":
            raise ValueError(f"unknown query '{phase}'")
        runtime = _runtime(context, settings(context))
        arrays = from_record(msg.content["arrays"], runtime.trainer.device) if "arrays" in msg.content else {}
        privacy = runtime.take_privacy(client, msg.content["config"])
        reply = set_up_reply(runtime, context, client, json.loads(msg.content["config"]["request"]), arrays, privacy,
                             msg.content["config"])
        return Message(RecordDict({"arrays": to_record(reply)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = _client_id(context, settings(context))
        runtime = _runtime(context, settings(context))
        trainer = runtime.trainer
        secure = "fitins.config" in msg.content.config_records  # SecAgg+: download as FitIns, upload as FitRes
        if secure:
            from .secure import download_of, fitres_content

            download, secure_settings = download_of(msg.content, trainer.device)
            privacy, clip = runtime.take_privacy(client, secure_settings), runtime.take_clip(secure_settings)
            if "request" in secure_settings:  # a phase of the set-up exchange, its sum carried by SecAgg+
                reply = set_up_reply(runtime, context, client, json.loads(secure_settings["request"]), download,
                                     privacy, secure_settings)
                return Message(fitres_content(reply, secure_settings, client), reply_to=msg)
            r = int(secure_settings["round"])
        else:
            download, r = from_record(msg.content["arrays"], trainer.device), int(msg.content["config"]["round"])
            privacy, clip = runtime.take_privacy(client, msg.content["config"]), runtime.take_clip(msg.content["config"])
        plan = runtime.distributed_plan(context, secure_settings if secure else None, clip)
        _inject_fault(r)
        runtime.restore(context, client)
        trainer.method.take_download(client, download)
        timeout = trainer.cfg.federation.client_timeout
        start = trainer.start(client, r)
        update = trainer.update(client, r, start, time.monotonic() + timeout if timeout else None, privacy, clip)
        runtime.keep(context, client)  # what the client keeps of its training (FedSA-LoRA's own B)
        runtime.save_own_state(context, client, r)
        if plan is not None:  # distributed DP: only the noised integers leave, into SecAgg+'s sum
            from .secure import integer_fitres_content

            upload = update.payload  # seal replaces it, leaving this dict as it is
            clean, noise = trainer.seal(client, r, update, start, plan)
            context.state.config_records[SEALED] = ConfigRecord({"round": r})
            keep_for_audit(f"round{r}-client{client}", lambda: {
                "upload": upload, "start": trainer.method.upload(client, start, r), "clean": clean, "noise": noise,
                "message": update.message})
            return Message(integer_fitres_content(update.message), reply_to=msg)
        if secure:
            return Message(fitres_content(update.payload, secure_settings, client), reply_to=msg)
        metrics = {"num-examples": trainer.plan.client_sizes[client]}
        if privacy is None and clip is None and update.loss == update.loss:  # under DP the loss is not released
            metrics["loss"] = update.loss
        if update.within_clip is not None:  # adaptive clipping counts them (noised on the server)
            metrics["within-clip"] = int(update.within_clip)
        return Message(RecordDict({"arrays": to_record(update.payload), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Flower's evaluate message, after a round's aggregation: the node applies the round's broadcast when
        it carries one ("arrays"), and when it carries the global model ("model") evaluates the model this client
        uses on its own evaluation data and replies with its metrics and "num-examples". An evaluation that fails
        is answered with its reason ("eval-error"): the broadcast stays applied."""
        client = _client_id(context, settings(context))
        runtime = _runtime(context, settings(context))
        runtime.restore(context, client)
        if "arrays" in msg.content:
            runtime.trainer.method.receive(from_record(msg.content["arrays"], runtime.trainer.device))
            runtime.keep(context, client)
        content = RecordDict({"metrics": MetricRecord({"applied": 1})})
        if "model" in msg.content:
            try:
                content["metrics"] = MetricRecord(runtime.evaluate(client, from_record(msg.content["model"],
                                                                                       runtime.trainer.device)))
            except Exception as err:  # the node's evaluation fails, not the run
                content["config"] = ConfigRecord({"eval-error": str(err).splitlines()[0] if str(err)
                                                  else type(err).__name__})
        return Message(content, reply_to=msg)

    return app


app = client_app()
