"""What the benchmarks share: synthetic batches, timing side by side, the machine's description."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def make_batch(vocab: int, batch: int, tokens: int, num_labels: int | None = 2) -> dict:
    """Random token ids (full attention); class labels, or next-token labels when num_labels is None."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, tokens), generator=g)
    labels = torch.randint(0, num_labels, (batch,), generator=g) if num_labels else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, tokens, dtype=torch.long), "labels": labels}


def classification_losses(model):
    def losses(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return losses


def causal_lm_losses(model):
    """Per-example mean next-token loss."""
    def losses(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return token.view(targets.shape).mean(1)
    return losses


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer stops when the step has run rather than been queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step) -> float:
    synchronize()
    t = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - t


def median_times(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of every step; the steps alternate so that drift hits them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(t) for name, t in times.items()}


def device_arguments(parser) -> None:
    """--device, and --dry-run: every step at a tiny size on the CPU, on tiny random models (see tiny_model)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny random models of the same architectures, tiny sizes, CPU (checks the script)")


def step_arguments(parser, models: list[str], batch: int, tokens: int, repeats: int, out: str,
                   choices: list[str] | None = None) -> None:
    """The arguments of a benchmark that times training steps of models at batch x tokens and a LoRA rank."""
    parser.add_argument("--models", nargs="+", default=models, choices=choices)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=out)
    device_arguments(parser)


def parse_step_arguments(parser):
    """step_arguments' values; a dry run takes one repeat of 2 x 16 tokens on the CPU."""
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.repeats, args.batch, args.tokens = "cpu", 1, 2, 16
    return args


# Small enough for a dry run in seconds, the preset's architecture otherwise (attention, MLP, norms, heads).
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, vocab_size=1024, max_position_embeddings=256)


def tiny_model(preset: str, classification: bool):
    """A model of the preset's architecture at TINY's sizes, random weights (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedlora.models import PRESETS

    settings = dict(PRESETS[preset].config)
    settings |= {k: v for k, v in TINY.items() if k in settings or k in ("hidden_size", "vocab_size")}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    if classification:
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens, then pad and eos): no vocabulary file needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   model_max_length=TINY["max_position_embeddings"])


def tiny_model_folder(preset: str, classification: bool, folder: str | Path) -> str:
    """tiny_model with the byte tokenizer, saved as a model folder (what model.path takes)."""
    model, tokenizer = tiny_model(preset, classification), byte_tokenizer()
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def load_base(preset: str, classification: bool, dry_run: bool, device: str):
    """The preset's pretrained model (tiny_model in a dry run), in training mode's dtype float32, on `device`."""
    from fedlora.models import load_causal_lm, load_classifier, resolve_model_source

    if dry_run:
        return tiny_model(preset, classification).to(device)
    source = resolve_model_source(preset, None)
    model, _ = load_classifier(source, 2) if classification else load_causal_lm(source)
    return model.to(device)


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def write_results(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload | machine(), indent=2) + "\n")
    print(f"\nwrote {path}")
