"""model.pooling = "mean": the head reads the attention-masked mean of the last hidden states."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from fedlora.errors import ConfigError
from fedlora.pooling import pool_by_mean


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def test_head_reads_the_masked_mean():
    plain = tiny_bert()
    pooled = copy.deepcopy(plain)
    pool_by_mean(pooled)
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = plain.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
        expected = plain.classifier(plain.bert.pooler.activation(plain.bert.pooler.dense(mean)))
        logits = pooled(input_ids=ids, attention_mask=mask).logits
        first_token = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits, first_token, atol=1e-3)  # the hook changed what the head reads


def test_padding_does_not_change_the_mean():
    model = tiny_bert()
    pool_by_mean(model)
    with torch.no_grad():
        short = model(input_ids=torch.tensor([[2, 5, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        padded = model(input_ids=torch.tensor([[2, 5, 3, 0, 0, 0]]),
                       attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


def test_a_decoder_is_refused():
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_labels=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="model.pooling"):
        pool_by_mean(LlamaForSequenceClassification(config))


def test_a_decoder_is_refused_before_its_data_or_weights_are_loaded(tmp_path, monkeypatch):
    import fedlora.experiment as experiment
    from fedlora.config import build_config

    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_labels=2, pad_token_id=0)
    config.save_pretrained(tmp_path / "decoder")  # a config and no weights: loading them would fail

    def never(*args, **kwargs):
        raise AssertionError("data or weights were loaded")

    monkeypatch.setattr(experiment, "load_task_data", never)
    monkeypatch.setattr(experiment, "load_classifier", never)
    cfg = build_config({"model": {"path": str(tmp_path / "decoder"), "pooling": "mean"},
                        "data": {"name": "sst2"}})
    with pytest.raises(ConfigError, match="model.pooling = 'mean' needs an encoder classifier"):
        experiment.build_task(cfg, torch.device("cpu"))
