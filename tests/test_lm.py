"""Causal language models: loss masking, option scoring, batched generation, and the core guarantees
(exactness, PEFT export, resume) on a Llama-architecture model; a real SmolLM2 federated run."""
import json

import pytest
import torch

from fedlora.config import build_config
from fedlora.lm_task import IGNORE, PLAIN_TEMPLATE
from fedlora.methods import METHODS
from fedlora.simulator import Simulator

from conftest import read_log, run_until_killed, without_seconds


@pytest.fixture
def lm_sim(lm_config, tmp_path):
    def make(**sections):
        return Simulator(lm_config(**sections), tmp_path / "run", progress=False)
    return make


def test_only_response_tokens_carry_loss(lm_sim):
    sim = lm_sim()
    task, tok = sim.task, sim.task.tokenizer
    prompt = task._prompt(task.data.train, 0)
    ids, labels = task.encode(prompt, "The answer is 7.")
    response = tok("The answer is 7.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE] * len(prompt) + response
    text = tok.decode(prompt)  # SmolLM2's chat template around the instruction
    assert text.count("<|im_start|>user") == 1 and text.endswith("<|im_start|>assistant\n")
    assert task.data.train.prompts[0] in text

    batch = task.batch([0, 1, 2])
    losses = task.example_losses(sim.model, batch)
    with torch.no_grad():  # by hand: cross-entropy on the response positions of each unpadded example
        for row, loss in enumerate(losses):
            n = int(batch["attention_mask"][row].sum())
            ids_row, lab = batch["input_ids"][row, :n], batch["labels"][row, :n]
            logits = sim.model(input_ids=ids_row[None]).logits[0, :-1]
            targets = lab[1:]
            keep = targets != IGNORE
            expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
            assert abs(loss.item() - expected.item()) < 1e-5
            assert (batch["labels"][row, n:] == IGNORE).all()
            assert (lab[:len(task._prompt(task.data.train, row))] == IGNORE).all()


def test_truncation_keeps_the_response(lm_sim):
    task = lm_sim(data={"max_length": 20}).task
    long_prompt = list(range(100, 140))
    ids, labels = task.encode(long_prompt, "yes")
    assert len(ids) == 20 and ids[-2:] == labels[-2:] and ids[:18] == long_prompt[-18:]


def test_plain_template_without_chat(lm_sim):
    task = lm_sim(data={"chat_template": False}).task
    assert task.prompt_text("Say hi.") == PLAIN_TEMPLATE.format(prompt="Say hi.")


def test_option_scoring_picks_the_highest_summed_log_likelihood(lm_sim):
    sim = lm_sim()
    task, split, model = sim.task, sim.task.data.eval, sim.model
    choice = [i for i in range(len(split)) if split.options[i] is not None]
    assert len(choice) >= 3
    picks = task.score_options(model, choice, batch_size=3)  # batches mix options of different examples
    tok = task.tokenizer
    for i, pick in zip(choice, picks):
        scores = []
        for option in split.options[i]:  # by hand, one unpadded sequence at a time
            prompt = tok(task.prompt_text(split.prompts[i]), add_special_tokens=False)["input_ids"]
            response = tok(f"the correct answer is {option}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(response)))
        assert abs(scores[0] - scores[1]) > 1e-4
        assert pick == max(range(len(scores)), key=scores.__getitem__)


def test_batched_generation_equals_one_at_a_time(lm_sim):
    task, model = (s := lm_sim()).task, s.model
    indices = list(range(6))
    batched = task.generate(model, indices, batch_size=4)
    alone = [task.generate(model, [i], batch_size=1)[0] for i in indices]
    assert batched == alone
    assert any(text for text in batched)


def test_evaluation_reports_accuracy_per_task_and_both_modes(lm_sim):
    sim = lm_sim(eval={"choice_mode": "both", "max_examples": 6})
    result = sim.task.evaluate(sim.model, batch_size=4, max_examples=6)
    split = sim.task.data.eval
    chosen = sim.task.eval_indices(6)
    assert len(chosen) == 6 and {split.tasks[i] for i in chosen} == {"sums", "reviews"}
    assert set(result) >= {"accuracy", "loss", "accuracy/sums", "accuracy/reviews",
                           "accuracy_generate/choice", "accuracy_score/choice"}
    assert 0 <= result["accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_core_guarantees_hold_on_llama(lm_config, tmp_path, monkeypatch, name):
    """Exact methods aggregate exactly, the export matches PEFT's forward, and a killed run resumes to
    bit-identical numbers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    keep = METHODS[name].carries_optimizer_state  # FedSVD and RoLoRA refuse to carry it (their factors change)
    cfg = lm_config(method={"name": name}, federation={"rounds": 2}, train={"keep_optimizer_state": keep})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    log = read_log(tmp_path / "whole")
    if name in ("ffa", "fedsb", "fedex", "flora", "full", "fedsvd", "rolora"):
        assert all(r["agg_error"] < 1e-5 for r in log[1:]), [r["agg_error"] for r in log]

    run_until_killed(Simulator(cfg, tmp_path / "cut", progress=False), monkeypatch, after_round=1)
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    assert without_seconds(read_log(tmp_path / "cut")) == without_seconds(log)
    a, b = whole.method.eval_state(), resumed.method.eval_state()
    assert all(torch.equal(a[k], b[k]) for k in a)

    batch = whole.task.batch(range(4), whole.task.data.eval)
    whole.adapted.load_state(whole.method.eval_state())
    whole.model.eval()
    with torch.no_grad():
        ours = whole.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if name == "full":
        theirs_model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    else:
        config = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM"
        # a base model in the run folder (FedEx-LoRA, FLoRA: base_model/) is named relative to it
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / config["base_model_name_or_path"])
        theirs_model = PeftModel.from_pretrained(base, tmp_path / "whole" / "adapter")
    with torch.no_grad():
        theirs = theirs_model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("grad_norm", ["ghost", "materialise"])
def test_dp_training_on_llama_matches_per_example_reference(lm_sim, grad_norm):
    """The clipped per-example gradient sum of a Llama batch equals torch.func's, example by example."""
    from torch.func import functional_call, grad

    sim = lm_sim(method={"name": "ffa"}, privacy={"noise_multiplier": 1.0, "grad_norm": grad_norm})
    sim.server.setup_privacy()
    keys = sim.method.trainable_keys(1)
    params = sim.adapted.parameters_by_key()
    batch = sim.task.batch([0, 1, 2, 3])
    with torch.no_grad():  # make B non-zero so that the gradients reach every factor
        for k in keys:
            params[k].normal_(0, 0.1)
    for p in sim.adapted.set_trainable(keys):
        p.grad = None
    recorder = sim.trainer.recorder(keys)
    with recorder.recording(batch["attention_mask"]):
        sim.task.example_losses(sim.model, batch).sum().backward()
    ours, _ = recorder.clipped_sum(0.5)

    names = {k: n for n, p in sim.model.named_parameters() for k, q in params.items() if p is q}
    expected = {k: torch.zeros_like(params[k]) for k in keys}
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :n] for k, v in batch.items()}
        g = grad(lambda w: sim.task.example_losses(
            lambda **kw: functional_call(sim.model, {names[k]: w[k] for k in keys}, kwargs=kw), one).sum())(
            {k: params[k].detach() for k in keys})
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        for k in keys:
            expected[k] += g[k] * min(1.0, 0.5 / (norm.item() + 1e-6))
    for k in keys:
        assert torch.allclose(ours[k], expected[k], atol=1e-5, rtol=1e-4), k


def test_partition_by_task(lm_sim):
    sim = lm_sim(data={"partition": "task"}, federation={"num_clients": 2, "clients_per_round": 2})
    tasks = sim.task.data.train.tasks
    for shard in sim.shards:
        assert len({tasks[i] for i in shard}) == 1
    assert sorted(i for s in sim.shards for i in s) == list(range(len(tasks)))


@pytest.mark.slow
def test_smollm2_federated_run_on_cpu(smollm2_dir, toy_instructions, tmp_path):
    """The real SmolLM2-135M-Instruct: 2 clients, 2 rounds of Fed-SB, generation and option scoring."""
    cfg = build_config({
        "seed": 0, "method": {"name": "fedsb"}, "model": {"name": "smollm2-135m", "path": smollm2_dir},
        "adapter": {"rank": 4},
        "data": {"name": None, "kind": "instructions", "max_length": 96, **toy_instructions},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
        "train": {"local_steps": 2, "batch_size": 2, "lr": 1e-3},
        "eval": {"every": 2, "max_examples": 4, "max_new_tokens": 8, "batch_size": 4},
        "fedsb": {"init_examples": 4},
    })
    summary = Simulator(cfg, tmp_path, progress=False).run()
    log = read_log(tmp_path)
    assert [r["round"] for r in log] == [0, 1, 2]
    assert all(r["agg_error"] < 1e-5 for r in log[1:])
    final = summary["final_eval"]
    assert {"accuracy/sums", "accuracy/reviews"} <= set(final) and final["loss"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
