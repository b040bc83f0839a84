"""LoRA adapters against their references: PEFT's PeftModel for the AR prior model, diffusers' PEFT integration for
the DiT (same tiny random models, adapters saved by the references); over quantized bases; unloading gives the base
back bit for bit; staged memory applies them again; the CLI and the server take them, and the metadata records them."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from commands import cli, run
from conftest import assert_close, rel_err, to_mx
from peft import LoraConfig, get_peft_model
from PIL import Image

from mlx_glm_image import lora
from mlx_glm_image.pipeline import GlmImagePipeline

AR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]  # the published guides' choice
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CALL = dict(prompt='a red cat "big"', height=64, width=96, num_inference_steps=2, seed=3, top_k=1, output_type="np")


@pytest.fixture(scope="module")
def ar_adapter(model_dir, tmp_path_factory):
    """A PEFT adapter on transformers' tiny AR model (random, non-zero B), saved as PeftModel.save_pretrained does,
    with the reference model that made it."""
    from transformers import GlmImageForConditionalGeneration

    torch.manual_seed(1)
    base = GlmImageForConditionalGeneration.from_pretrained(model_dir / "vision_language_encoder").eval()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=AR_TARGETS, init_lora_weights=False,
                                           alpha_pattern={"down_proj": 2}))
    out = tmp_path_factory.mktemp("ar-adapter")
    peft.save_pretrained(out)
    return out, peft.eval()


@pytest.fixture(scope="module")
def dit_adapter(model_dir, tmp_path_factory):
    """A diffusers DiT adapter (add_adapter + save_lora_adapter: pytorch_lora_weights.safetensors, config in its
    metadata), with the reference DiT carrying it."""
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(2)
    dit = GlmImageTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    dit.add_adapter(LoraConfig(r=8, lora_alpha=4, target_modules=DIT_TARGETS, init_lora_weights=False), adapter_name="style")
    out = tmp_path_factory.mktemp("dit-adapter")
    dit.save_lora_adapter(out, adapter_name="style")
    return out, dit


def dit_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 12, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                prior_token_id=torch.randint(0, 40, (2, 24), generator=g), prior_token_drop=torch.zeros(2, 24, dtype=torch.bool),
                timestep=torch.tensor([500.0, 20.0]), target_size=torch.tensor([[64.0, 96.0]] * 2), crop_coords=torch.zeros(2, 2))


def mlx_dit(dit, kw):
    return dit(**{k: to_mx(v) for k, v in kw.items()}, return_dict=False)[0]


def test_ar_logits_equal_peft(model_dir, ar_adapter):
    path, peft = ar_adapter
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    ids = torch.tensor([[90, 91, 92, 93, 94, 95]])
    base = np.array(pipe.vision_language_encoder(mx.array(ids.numpy())))
    assert pipe.load_lora_weights(path, adapter_name="ar") == "ar"
    got = pipe.vision_language_encoder(mx.array(ids.numpy()))
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    assert_close(got, want, 1e-4, what="AR logits with the adapter")
    assert rel_err(got, base) > 1e-3, "the adapter changes the logits"
    pipe.unload_lora_weights()
    assert np.array_equal(np.array(pipe.vision_language_encoder(mx.array(ids.numpy()))), base), "unloaded: the base, bit for bit"


def test_dit_equal_diffusers_at_two_scales_and_unloaded(model_dir, dit_adapter):
    path, ref = dit_adapter
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    kw = dit_inputs()
    base = np.array(mlx_dit(pipe.transformer, kw))
    pipe.load_lora_weights(path / "pytorch_lora_weights.safetensors", adapter_name="style")
    for weight in (1.0, 0.4):
        ref.set_adapters(["style"], weights=[weight])
        pipe.set_adapters(["style"], [weight])
        with torch.no_grad():
            want = ref(**kw, return_dict=False)[0]
        assert_close(mlx_dit(pipe.transformer, kw), want, 1e-4, what=f"DiT with the adapter at {weight}")
    pipe.set_adapters([], [])
    assert np.array_equal(np.array(mlx_dit(pipe.transformer, kw)), base), "no active adapter: the base"
    pipe.set_adapters("style", 0.4)
    fused_before = np.array(mlx_dit(pipe.transformer, kw))
    pipe.fuse_lora()
    assert any(isinstance(m, lora.FusedLinear) for _, m in pipe.transformer.named_modules())
    assert_close(mlx_dit(pipe.transformer, kw), fused_before, 1e-5, what="fused")
    pipe.unfuse_lora()
    assert np.array_equal(np.array(mlx_dit(pipe.transformer, kw)), fused_before), "unfused: the separate path again"
    pipe.unload_lora_weights()
    assert np.array_equal(np.array(mlx_dit(pipe.transformer, kw)), base), "unloaded: the base, bit for bit"
    with torch.no_grad():
        ref.set_adapters(["style"], weights=[1.0])


def test_over_a_quantized_base(model_dir, dit_adapter):
    """A separate low-rank path beside each quantized layer: it adds what it adds over the full-precision base, and
    the quantized weights are never changed."""
    path, _ = dit_adapter
    fp = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    q = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", quantize=8)
    kw = dit_inputs(1)
    bases = [np.array(mlx_dit(p.transformer, kw)) for p in (fp, q)]
    weights = {k: np.array(v) for k, v in tree_flatten(q.transformer.parameters())}
    for p in (fp, q):
        p.load_lora_weights(path, adapter_name="style")
    deltas = [np.array(mlx_dit(p.transformer, kw)) - b for p, b in zip((fp, q), bases)]
    assert any(type(m).__name__ == "LoRALinear" and type(m.base).__name__ == "QuantizedLinear"
               for _, m in q.transformer.named_modules())
    assert rel_err(deltas[1], deltas[0]) < 0.05, "the adapter adds the same over the 8-bit base"
    q.fuse_lora()  # quantized layers keep their separate path; full-precision ones fold it in
    kinds = {(type(m).__name__, type(m.base).__name__) for _, m in q.transformer.named_modules() if isinstance(m, lora.LoRALinear)}
    assert kinds == {("LoRALinear", "QuantizedLinear")}
    q.unfuse_lora()
    q.unload_lora_weights()
    assert np.array_equal(np.array(mlx_dit(q.transformer, kw)), bases[1])
    after = dict(tree_flatten(q.transformer.parameters()))
    assert all(np.array_equal(np.array(after[k]), v) for k, v in weights.items())


def test_two_adapters_and_staged_memory_applies_them_again(model_dir, ar_adapter, dit_adapter):
    resident = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    staged = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    plain = resident(**CALL).images
    for p in (resident, staged):
        p.load_lora_weights(ar_adapter[0], adapter_name="ar", scale=0.5)
        p.load_lora_weights(dit_adapter[0], adapter_name="style", scale=0.8)
    assert resident.components.adapters["ar"].model == "vision_language_encoder"
    assert resident.components.adapters["style"].model == "transformer"
    with_both = resident(**CALL).images
    assert np.abs(with_both - plain).max() > 1e-3
    assert np.array_equal(staged(**CALL).images, with_both)
    assert np.array_equal(staged(**CALL).images, with_both), "loaded again for the second call, adapters too"
    assert staged.loads == 8
    record = resident.record(resident.request(**CALL))
    assert [(r["name"], r["scale"], r["model"]) for r in record["lora"]] == [
        ("ar", 0.5, "vision_language_encoder"), ("style", 0.8, "transformer")]
    assert all(len(r["sha256"]) == 64 for r in record["lora"])


def test_bad_adapters_are_one_line(model_dir, dit_adapter, tmp_path):
    from safetensors.numpy import save_file

    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 7), np.float32),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 4), np.float32)}, str(tmp_path / "shape.safetensors"))
    save_file({"transformer_blocks.0.nothing.lora_A.weight": np.zeros((4, 32), np.float32),
               "transformer_blocks.0.nothing.lora_B.weight": np.zeros((32, 4), np.float32)}, str(tmp_path / "where.safetensors"))
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 32), np.float32)}, str(tmp_path / "half.safetensors"))
    for source, message in [(tmp_path / "none", "does not exist"),
                            (tmp_path / "shape.safetensors", "transformer_blocks.0.attn1.to_q takes 32 -> 32, the adapter has 7 -> 32"),
                            (tmp_path / "where.safetensors", "fit no model here (vision_language_encoder has no linear layer transformer_blocks.0.nothing; transformer has no linear layer"),
                            (tmp_path / "half.safetensors", "has only A of its lora_A/lora_B pair")]:
        with pytest.raises(lora.LoraError) as caught:
            pipe.load_lora_weights(source)
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    pipe.load_lora_weights(dit_adapter[0], adapter_name="style")
    with pytest.raises(lora.LoraError, match="an adapter named 'style' is loaded already"):
        pipe.load_lora_weights(dit_adapter[0], adapter_name="style")
    with pytest.raises(lora.LoraError, match="no adapter named 'other'"):
        pipe.set_adapters(["other"])


def test_cli_lora_recorded_and_reproduced(model_dir, dit_adapter, tmp_path):
    args = ["-m", model_dir, "--prompt", 'a red cat "big"', "--height", 64, "--width", 96, "--steps", 2, "--seed", 3,
            "--top-k", 1, "--dtype", "float32", "--quiet"]
    proc = cli(*args, "--lora", f"{dit_adapter[0]}:0.7", "--output", tmp_path / "a.png")
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(Image.open(tmp_path / "a.png").text["glm-image"])["lora"]
    assert record["source"] == str(dit_adapter[0]) and record["scale"] == 0.7 and record["model"] == "transformer"
    assert cli(*args, "--output", tmp_path / "plain.png").returncode == 0
    pixels = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "plain.png"))
    proc = cli("--config-from-metadata", tmp_path / "a.png", "--output", tmp_path / "again.png", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "a.png"))
    proc = cli(*args, "--lora", tmp_path / "none", "--output", tmp_path / "never.png")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: --lora {tmp_path / 'none'} does not exist"
    assert not (tmp_path / "never.png").exists()


def test_the_server_takes_adapters_at_start(model_dir, dit_adapter):
    from test_server import FAST, Server, decode

    plain = Server(model_dir, "--memory", "resident")
    with_lora = Server(model_dir, "--memory", "resident", "--lora", f"{dit_adapter[0]}:0.7")
    try:
        listed = with_lora.client().models.list().data[0].model_extra["lora"]
        assert listed == [{"name": Path(dit_adapter[0]).name, "scale": 0.7, "model": "transformer",
                           "source": str(dit_adapter[0])}]
        images = [decode(s.client().images.generate(prompt="a cat", size="96x64", extra_body=FAST).data[0])
                  for s in (plain, with_lora)]
        assert not np.array_equal(*images)
    finally:
        plain.stop()
        with_lora.stop()
    bad = run("server", "-m", model_dir, "--lora", "/no/such", timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --lora /no/such does not exist"


def test_convert_folds_an_adapter_in(model_dir, dit_adapter, tmp_path):
    """convert --lora: the converted DiT computes what the original with the adapter does (folded, one rule with
    fuse_lora), and its config records the adapter."""
    from mlx_glm_image import GlmImageTransformer2DModel, load_model
    from mlx_glm_image.convert import convert

    convert(str(model_dir), tmp_path / "baked", components=["transformer"], loras=[f"{dit_adapter[0]}:0.6"],
            verbose=False)
    baked = load_model(GlmImageTransformer2DModel, tmp_path / "baked" / "transformer")
    (recorded,) = json.loads((tmp_path / "baked" / "transformer" / "config.json").read_text())["lora"]
    assert recorded["scale"] == 0.6 and recorded["model"] == "transformer" and len(recorded["sha256"]) == 64
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    pipe.load_lora_weights(dit_adapter[0], scale=0.6)
    kw = dit_inputs(2)
    assert_close(mlx_dit(baked, kw), mlx_dit(pipe.transformer, kw), 1e-5, what="baked vs loaded")
    with pytest.raises(lora.LoraError, match="fit no model here"):
        convert(str(model_dir), tmp_path / "other", components=["vae"], loras=[str(dit_adapter[0])], verbose=False)


def test_an_adapter_from_the_hub(model_dir, dit_adapter, monkeypatch):
    """A repo id goes through the one loading rule: only the adapter's files are fetched."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(dit_adapter[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    assert pipe.load_lora_weights("someone/glm-image-style") == "glm-image-style"
    assert asked == [("someone/glm-image-style", [*lora.FILES, "adapter_config.json"])]
    assert pipe.components.adapters.records()[0]["source"] == "someone/glm-image-style"
