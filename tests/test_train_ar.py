"""Training a LoRA on the AR prior model, against the references: the training sequence is what the prior stage feeds
the model, the target codes are transformers' VQ codes, and the loss, every adapter gradient and several AdamW steps
equal PEFT on transformers' ``GlmImageForConditionalGeneration`` (fp32, 1e-4 relative); the saved adapter loads
into PEFT and into our --lora path.

The tiny checkpoint has the released model's 16-pixel vision patch, so an H x W image's grid is H/32 x W/32.
"""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from conftest import assert_close  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_glm_image import lora  # noqa: E402
from mlx_glm_image.loading import load_model  # noqa: E402
from mlx_glm_image.models.ar import GlmImageForConditionalGeneration  # noqa: E402
from mlx_glm_image.pipeline.prior_grid import prior_prompt, prior_sequences, prior_token_ids, upsample_token_ids  # noqa: E402
from mlx_glm_image.pipeline.prior_tokens import drain  # noqa: E402
from mlx_glm_image.pipeline.processor import GlmImageProcessor  # noqa: E402
from mlx_glm_image.train import optim as train_optim  # noqa: E402
from mlx_glm_image.train.ar import IGNORE_INDEX, ar_example, ar_loss, downsample_nearest, target_codes  # noqa: E402

from tiny_checkpoints import write_prior  # noqa: E402

H, W = 96, 128  # a 3x4 target grid, a 13x18 preview grid
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
CONFIG = lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ar")
    tproc, tmodel, _ = write_prior(root, vision_patch=16)
    return dict(root=root, tproc=tproc, tmodel=tmodel, proc=GlmImageProcessor.from_pretrained(root),
                model=load_model(GlmImageForConditionalGeneration, root))


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _example(tiny, prompt="a red cat on the mat", seed=0, sources=None):
    model, proc = tiny["model"], tiny["proc"]
    codes = target_codes(model, proc, _image(H, W, seed), H, W)
    return ar_example(model, proc, prompt, codes, H, W, images=sources), codes


def _torch_inputs(tiny, prompt, sources=None):
    content = [{"type": "image", "image": im} for im in sources or []] + [{"type": "text", "text": prompt}]
    return tiny["tproc"].apply_chat_template([[{"role": "user", "content": content}]], tokenize=True, target_h=H,
                                             target_w=W, return_dict=True, return_tensors="pt")


class Recorder:
    """The model, recording the ids and positions of every call the prior stage makes."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, **kwargs):
        self.calls.append((np.array(input_ids), np.array(kwargs["position_ids"])))
        return self.model(input_ids, **kwargs)


def _forcing(tokens):
    """A sampler that writes ``tokens`` in order, whatever the logits."""
    it = iter(tokens.tolist())
    return lambda logits, key: mx.array([next(it)], dtype=mx.int32)


# ---- the sequence ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", [False, True])
def test_the_training_sequence_is_what_the_prior_stage_feeds(tiny, edit):
    sources = [_image(64, 96, 3)] if edit else None
    ex, codes = _example(tiny, sources=sources)
    L = ex.prompt_length
    th, tw = ex.grids.target
    assert (th, tw) == (H // 32, W // 32) and ex.grids.preview == (None if edit else (13, 18))
    # the prior stage generating exactly this grid: every id and position it feeds, and what it writes
    recorder = Recorder(tiny["model"])
    pp = prior_prompt(tiny["model"], tiny["proc"], ["a red cat on the mat"], H, W, [sources] if edit else None)
    mx.disable_compile()
    try:
        sequences = drain(prior_sequences(recorder, pp, _forcing(ex.labels[0, L:])))
    finally:
        mx.enable_compile()
    fed_ids = np.concatenate([ids for ids, _ in recorder.calls], axis=1)
    fed_pos = np.concatenate([pos for _, pos in recorder.calls], axis=2)
    np.testing.assert_array_equal(fed_ids, ex.input_ids[:, :-1])  # the end token is written, never fed
    np.testing.assert_array_equal(fed_pos, ex.position_ids[..., :-1])
    np.testing.assert_array_equal(sequences, ex.input_ids)
    np.testing.assert_array_equal(ex.labels[0, :L], IGNORE_INDEX)
    assert ex.input_ids[0, L - 1] == tiny["model"].config.image_start_token_id  # the prompt ends with it
    # the grid the DiT gets out of that sequence is the image's own
    np.testing.assert_array_equal(np.array(prior_token_ids(sequences, pp))[0], upsample_token_ids(codes, th, tw))
    # transformers: the prompt's ids and positions, and the decode positions it caches for generation
    inputs = _torch_inputs(tiny, "a red cat on the mat", sources)
    tm = tiny["tmodel"].model
    with torch.no_grad():
        pos, _ = tm.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["images_per_sample"])
    decode = tm._cached_decode_position_ids.permute(1, 0, 2).numpy()
    np.testing.assert_array_equal(ex.position_ids[..., :L], pos.numpy())
    np.testing.assert_array_equal(ex.position_ids[..., L:], decode[..., :ex.input_ids.shape[1] - L])
    placeholders = inputs["input_ids"].numpy() == tiny["model"].config.image_token_id
    np.testing.assert_array_equal(ex.input_ids[:, :L][~placeholders], inputs["input_ids"].numpy()[~placeholders])


def test_target_codes_equal_transformers_vq_codes(tiny):
    image = _image(H, W, 5)
    codes = target_codes(tiny["model"], tiny["proc"], image, H, W)
    inputs = _torch_inputs(tiny, "a cat", [image])  # the path editing takes for a source image
    tm = tiny["tmodel"]
    grids = inputs["image_grid_thw"][:-1]
    assert grids.tolist() == [[1, H // 32, W // 32]]
    with torch.no_grad():
        ref = tm.get_image_tokens(tm.get_image_features(inputs["pixel_values"], grids).pooler_output).numpy()
    np.testing.assert_array_equal(codes.reshape(-1), ref.reshape(-1))
    assert len(np.unique(codes)) > 3


@pytest.mark.parametrize("size,out", [((3, 4), (13, 18)), ((32, 24), (18, 13)), ((32, 32), (16, 16)), ((5, 7), (2, 3)),
                                      ((48, 64), (13, 18)), ((64, 16), (32, 8)), ((40, 56), (13, 18))])
def test_preview_grid_is_torch_nearest_downsampling(size, out):
    codes = np.random.default_rng(0).integers(0, 1000, size)
    ref = torch.nn.functional.interpolate(torch.tensor(codes, dtype=torch.float64)[None, None], size=out, mode="nearest")
    np.testing.assert_array_equal(downsample_nearest(codes, out), ref[0, 0].numpy().astype(np.int64))


# ---- the adapter layers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    lora.LoraConfig(target_modules=TARGETS),
    lora.LoraConfig(target_modules=("q_proj", "down_proj"), layers_to_transform=(1,)),
    lora.LoraConfig(target_modules=("self_attn.v_proj", "model.language_model.layers.0.mlp.down_proj")),
    lora.LoraConfig(target_modules=r".*layers\.0\.self_attn\.(q|k)_proj"),
    lora.LoraConfig(target_modules=("qkv", "fc1"), layers_to_transform=(0,), layers_pattern="blocks"),
])
def test_targets_are_the_modules_peft_wraps(tiny, config):
    model = load_model(GlmImageForConditionalGeneration, tiny["root"])
    ours = lora.add_trainable(model, config, mx.random.key(0))
    ref = peft.get_peft_model(copy.deepcopy(tiny["tmodel"]), _peft_config(config))
    theirs = sorted(name.removeprefix("base_model.model.") for name, m in ref.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    assert ours == theirs and ours
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == sorted(
        f"{p}.lora_{x}" for p in ours for x in "AB")


def test_initialisation_is_peft_default(tiny):
    model = load_model(GlmImageForConditionalGeneration, tiny["root"])
    ids = mx.array(np.arange(20)[None] % 80)
    before = model(ids)
    lora.add_trainable(model, CONFIG, mx.random.key(0))
    np.testing.assert_array_equal(np.array(model(ids)), np.array(before))  # B = 0: the base model's output
    for path, (a, b) in lora.trained(model).items():
        bound = 1 / np.sqrt(a.shape[1])
        assert not np.any(np.array(b)) and np.abs(np.array(a)).max() <= bound
        assert np.abs(np.array(a)).max() > 0.9 * bound and abs(float(a.mean())) < 0.1 * bound  # U(-bound, bound)


def _peft_config(config: lora.LoraConfig):
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0,
                           use_rslora=config.use_rslora, layers_pattern=config.layers_pattern,
                           layers_to_transform=config.layers_to_transform and list(config.layers_to_transform))


def _pair(tiny, config=CONFIG, seed=0):
    """Our model with trainable adapters (B random, so that every gradient is non-zero) and PEFT on transformers'
    model with the same A and B."""
    model = load_model(GlmImageForConditionalGeneration, tiny["root"])
    lora.add_trainable(model, config, mx.random.key(seed))
    rng = np.random.default_rng(seed)
    ref = peft.get_peft_model(copy.deepcopy(tiny["tmodel"]), _peft_config(config)).train()
    modules = dict(model.named_modules())
    for path, (a, b) in lora.trained(model).items():
        layer = modules[path]
        layer.lora_B = mx.array(0.2 * rng.standard_normal(b.shape).astype(np.float32))
        theirs = ref.base_model.model.get_submodule(path)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(torch.tensor(np.array(a)))
            theirs.lora_B["default"].weight.copy_(torch.tensor(np.array(layer.lora_B)))
    return model, ref


def _torch_loss(ref, ex):
    logits = ref(input_ids=torch.tensor(ex.input_ids), position_ids=torch.tensor(ex.position_ids)).logits
    labels = torch.tensor(ex.labels)
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX), logits


def _named_trainable(ref):
    """PEFT's trainable parameters by our names (``<module>.lora_A.weight``)."""
    return {name.removeprefix("base_model.model.").replace(".default", ""): p
            for name, p in ref.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [CONFIG, lora.LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, use_rslora=True)])
def test_loss_and_every_gradient_equal_peft(tiny, config):
    ex, _ = _example(tiny)
    model, ref = _pair(tiny, config)
    loss, grads = nn.value_and_grad(model, lambda: ar_loss(model, ex))()
    ref_loss, _ = _torch_loss(ref, ex)
    ref_loss.backward()
    assert_close(loss, ref_loss.detach(), what="loss")
    theirs = {k: p.grad for k, p in _named_trainable(ref).items()}
    ours = dict(tree_flatten(grads))
    assert sorted(ours) == sorted(k.removesuffix(".weight") for k in theirs) and len(ours) == 2 * 6 * 2
    for key, g in theirs.items():
        assert float(g.abs().max()) > 0
        assert_close(ours[key.removesuffix(".weight")], g, what=key)


def test_adamw_steps_with_warmup_cosine_clipping_and_accumulation_equal_torch(tiny):
    from transformers import get_cosine_schedule_with_warmup

    examples = [_example(tiny, "a red cat on the mat", 0)[0], _example(tiny, "big blue sky", 1)[0]]
    model, ref = _pair(tiny)
    start = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    settings = dict(learning_rate=5e-3, weight_decay=0.1, warmup_steps=2, steps=5)
    max_grad_norm = 0.05
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=settings["warmup_steps"],
                                               num_training_steps=settings["steps"])
    ours = train_optim.adamw(**settings)
    loss_and_grad = nn.value_and_grad(model, lambda ex: ar_loss(model, ex))
    norms = []
    for _ in range(4):
        for ex in examples:
            (_torch_loss(ref, ex)[0] / len(examples)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        schedule.step()
        opt.zero_grad()
        acc = train_optim.Accumulator()
        for ex in examples:
            acc.add(loss_and_grad(ex)[1])
        norm, _ = train_optim.apply_step(model, ours, acc.mean(), max_grad_norm)
        mx.eval(model.trainable_parameters(), ours.state)
        assert_close(norm, ref_norm, what="gradient norm")
        norms.append(float(norm))
    assert max(norms) > max_grad_norm  # clipping took part
    theirs = {k.removesuffix(".weight"): p for k, p in _named_trainable(ref).items()}
    assert sorted(theirs) == sorted(start)
    for key, value in tree_flatten(model.trainable_parameters()):
        assert np.abs(np.array(value) - start[key]).max() > 1e-3  # the steps moved it
        assert_close(value, theirs[key], what=key)


def test_schedule_is_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=50)
    ours = train_optim.cosine_with_warmup(3e-4, 10, 50)
    for n in range(60):
        assert abs(float(ours(n)) - opt.param_groups[0]["lr"]) <= 1e-6 * 3e-4, n
        opt.step()
        sched.step()
    assert float(ours(0)) == 0.0


def test_clipping_is_torch_clip_grad_norm():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 10.0):
        grads = {"a": rng.standard_normal((4, 5)).astype(np.float32) * scale, "b": [rng.standard_normal(7).astype(np.float32)]}
        ts = [torch.nn.Parameter(torch.zeros(4, 5)), torch.nn.Parameter(torch.zeros(7))]
        ts[0].grad, ts[1].grad = torch.tensor(grads["a"]), torch.tensor(grads["b"][0])
        ref_norm = torch.nn.utils.clip_grad_norm_(ts, 1.0)
        clipped, norm = train_optim.clip_grad_norm({"a": mx.array(grads["a"]), "b": [mx.array(grads["b"][0])]}, 1.0)
        assert_close(norm, ref_norm, tol=1e-6, what="norm")
        assert_close(clipped["a"], ts[0].grad, tol=1e-6, what="a")
        assert_close(clipped["b"][0], ts[1].grad, tol=1e-6, what="b")


# ---- saving -----------------------------------------------------------------------------------------------
def test_saved_adapter_loads_into_peft_and_into_our_lora_path(tiny, tmp_path):
    ex, _ = _example(tiny)
    config = lora.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=True)
    model, _ = _pair(tiny, config, seed=3)
    out = lora.save_peft(tmp_path / "adapter", model, config)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.numpy import load_file

    keys = sorted(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 24
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    logits = model(mx.array(ex.input_ids), position_ids=mx.array(ex.position_ids))
    # PEFT reads it into transformers' model and gives our logits
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny["tmodel"]), out).eval()
    with torch.no_grad():
        ref = loaded(input_ids=torch.tensor(ex.input_ids), position_ids=torch.tensor(ex.position_ids)).logits
        bare = tiny["tmodel"](input_ids=torch.tensor(ex.input_ids), position_ids=torch.tensor(ex.position_ids)).logits
    assert float((ref - bare).abs().max()) > 1e-2  # the adapter changes the output
    assert_close(logits, ref, what="logits with the saved adapter")
    # our --lora path reads the very layers trained, and gives the very same logits
    adapter = lora.read(str(out))
    trained = lora.trained(model)
    assert sorted(adapter.layers) == sorted(trained)
    for path, (a, b, s) in adapter.layers.items():
        np.testing.assert_array_equal(np.array(a), np.array(trained[path][0]))
        np.testing.assert_array_equal(np.array(b), np.array(trained[path][1]))
        assert s == config.scaling == 6 / 2
    fresh = load_model(GlmImageForConditionalGeneration, tiny["root"])
    lora.apply(fresh, [(adapter, 1.0)])
    np.testing.assert_array_equal(np.array(fresh(mx.array(ex.input_ids), position_ids=mx.array(ex.position_ids))),
                                  np.array(logits))


def test_a_quantized_base_trains_its_adapters(tiny):
    """QLoRA: a 4-bit base stays as it is, and the adapters' loss and gradients are those over a plain base with its
    dequantized weights."""
    quantized, plain = (load_model(GlmImageForConditionalGeneration, tiny["root"]) for _ in range(2))
    text = quantized.model.language_model
    nn.quantize(text, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    dequantized = [(f"model.language_model.{p}.weight", mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits))
                   for p, m in text.named_modules() if isinstance(m, nn.QuantizedLinear)]
    plain.load_weights(dequantized, strict=False)
    rng = np.random.default_rng(0)
    for model in (quantized, plain):
        lora.add_trainable(model, CONFIG, mx.random.key(0))
    for path, (a, b) in lora.trained(quantized).items():
        value = mx.array(0.2 * rng.standard_normal(b.shape).astype(np.float32))
        for model in (quantized, plain):
            dict(model.named_modules())[path].lora_B = value
    layer = text.layers[0].self_attn.q_proj
    assert isinstance(layer.base, nn.QuantizedLinear)
    ex, _ = _example(tiny)
    loss, grads = nn.value_and_grad(quantized, lambda: ar_loss(quantized, ex))()
    ref_loss, ref_grads = nn.value_and_grad(plain, lambda: ar_loss(plain, ex))()
    assert_close(loss, ref_loss, what="loss")
    ref = dict(tree_flatten(ref_grads))
    assert len(ref) == 24
    for key, g in tree_flatten(grads):
        assert float(mx.abs(g).max()) > 0
        assert_close(g, ref[key], what=key)
