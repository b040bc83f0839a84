"""Tiny random GLM-Image checkpoints in the exact diffusers / transformers folder layout (save_pretrained).

The AR prior model (vision_language_encoder/ + processor/) and the diffusion side (transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) can be written separately or together as one pipeline folder.
"""

import json
import math

import torch

LATENT = 4


N_VISION = 80  # vision vocab: 64 VQ codes, image start 64, image end 65, spare up to 79
IMAGE_START, IMAGE_END = 64, 65
TEMPLATE = (
    "[gMASK]{% for message in messages %}<|{{ message.role }}|>{% if message.content is string %}"
    "{{ message.content }}{% else %}{% for item in message.content %}{% if item.type == 'image' %}"
    "<|dit_token_64|><|image|><|dit_token_65|>{% elif item.type == 'text' %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<|dit_token_{i}|>": i for i in range(N_VISION)}
    for w in ["<unk>", "a", "cat", "dog", "red", "on", "the", "mat", "big", "blue", "sky"] + [str(i) for i in range(100)]:
        vocab[w] = len(vocab)
    specials = ["<|image|>", "<sop>", "<eop>", "<|user|>", "<|assistant|>", "[gMASK]", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials]
                           + [AddedToken(f"<|dit_token_{i}|>", special=True, normalized=False) for i in (64, 65)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|dit_token_64|>",
        eos_token="<|dit_token_65|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )
    return fast, vocab


def _tiny_config(vocab, vision_patch=8, text=None):
    from transformers import GlmImageConfig

    return GlmImageConfig(
        text_config={**dict(
            vocab_size=len(vocab), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vision_vocab_size=N_VISION, pad_token_id=vocab["<pad>"],
            eos_token_id=IMAGE_END,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                 mrope_section=[2, 3, 3]),
        ), **(text or {})},
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, image_size=128, patch_size=vision_patch),
        vq_config=dict(embed_dim=16, num_embeddings=64, latent_channels=32),
        image_token_id=vocab["<|image|>"], image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END,
    )


def _randomize(model):
    # weights of O(1) effect (norm gains, biases, well-scaled linears) so that a wrong op shows in the logits
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embed" not in name and "embedding" not in name:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


def write_diffusion_side(folder, codebook=40, layers=2, time_scale=1.0):
    """transformer/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json, as save_pretrained writes them.

    ``time_scale`` < 1 damps the DiT's timestep conditioning (its embedder and the blocks' AdaLN weights), so that
    consecutive steps differ about as little as a trained model's and a step cache has steps to skip."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline as TorchPipeline
    from diffusers import GlmImageTransformer2DModel as TorchDiT
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    dit = TorchDiT(
        patch_size=2, in_channels=LATENT, out_channels=LATENT, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=codebook,
    ).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "norm1.linear" in name or name.startswith("time_condition_embed"):
                p.mul_(time_scale)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=LATENT, norm_num_groups=4,
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 1.1, 2.0],
    ).eval()
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=384, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    ).eval()
    tokenizer = ByT5Tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256,
    )
    dit.save_pretrained(folder / "transformer", max_shard_size="40KB")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "GlmImagePipeline", "_diffusers_version": "0.37.0.dev0",  # as the released one lists them
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "ByT5Tokenizer"], "transformer": ["diffusers", "GlmImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return TorchPipeline(tokenizer=tokenizer, processor=None, text_encoder=text_encoder, vision_language_encoder=None,
                         vae=vae, transformer=dit, scheduler=scheduler)


def write_prior(root, eos_row_zero=False, vision_patch=8, text=None):
    """processor/ and vision_language_encoder/ (sharded). Returns (torch processor, torch model, vocab).

    vision_patch=16 makes a condition image's token grid H/32 x W/32 (the processor halves the image), as in the released model
    (its prior ids, upsampled 2x, then cover the DiT's H/16 x W/16 grid); 8 gives more tokens for parity. ``text``:
    text_config keys that replace the tiny ones.
    """
    from transformers import GlmImageForConditionalGeneration as TorchModel
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil
    from transformers.models.glm_image.processing_glm_image import GlmImageProcessor as TorchProcessor

    torch.manual_seed(0)
    fast, vocab = _tiny_tokenizer()
    ip = GlmImageImageProcessorPil(patch_size=vision_patch, temporal_patch_size=1, merge_size=1,
                                   size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})
    tproc = TorchProcessor(image_processor=ip, tokenizer=fast, chat_template=TEMPLATE)
    tproc.save_pretrained(root / "processor")
    tmodel = TorchModel(_tiny_config(vocab, vision_patch, text)).eval()
    _randomize(tmodel)
    if eos_row_zero:  # a random tiny model otherwise ends before its grid is complete
        with torch.no_grad():
            tmodel.lm_head.weight[IMAGE_END] = 0
    tmodel.generation_config.eos_token_id = IMAGE_END
    tmodel.generation_config.pad_token_id = vocab["<pad>"]
    tmodel.save_pretrained(root / "vision_language_encoder", max_shard_size="200KB")
    return tproc, tmodel, vocab


def write_transformer_only(folder):
    """model_index.json naming the transformer alone, transformer/ (sharded, with its index json) and scheduler/: a
    DiT wider than the pipeline's (3 blocks of 4 heads of 32, a 64-code codebook)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel as TorchDiT

    torch.manual_seed(0)
    dit = TorchDiT(patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=32, num_attention_heads=4,
                   text_embed_dim=64, time_embed_dim=64, condition_dim=16, prior_vq_quantizer_codebook_size=64).eval()
    dit.save_pretrained(folder / "transformer", max_shard_size="200KB")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline",
                                                         "transformer": ["diffusers", "GlmImageTransformer2DModel"]}))
    return folder


def write_pipeline(root):
    """A whole pipeline folder: the diffusion side and the AR side, as zai-org/GLM-Image lays it out."""
    write_diffusion_side(root, codebook=N_VISION)
    write_prior(root, eos_row_zero=True, vision_patch=16)
    index = json.loads((root / "model_index.json").read_text())
    index.update(processor=["transformers", "GlmImageProcessor"],
                 vision_language_encoder=["transformers", "GlmImageForConditionalGeneration"])
    (root / "model_index.json").write_text(json.dumps(index))
    return root
