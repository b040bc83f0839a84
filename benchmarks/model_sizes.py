"""On-disk size of each released GLM-Image component at bf16, 8-bit and 4-bit, from the shapes alone.

Builds every MLX model at its released config without allocating it (MLX parameters are lazy), applies the
converter's quantization policy (weights.QUANT_POLICY) and counts bytes: bf16 tensors 2 bytes per value; a
quantized layer bits/8 per weight plus a bf16 scale and bias per group of 64. The text encoder
(fp32) and the VAE stay in full precision, as convert.py's default policy keeps them.

    python benchmarks/model_sizes.py
"""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlx.utils import tree_flatten  # noqa: E402

from bench_prior import RELEASED as AR  # noqa: E402
from bench_transformer import CONFIGS  # noqa: E402
from mlx_glm_image import quantize as Q  # noqa: E402
from mlx_glm_image.convert import COMPONENTS  # noqa: E402

RELEASED = {
    "vision_language_encoder": AR,
    "transformer": CONFIGS["released"],
    # docs/checkpoint.md; the checkpoint's own config.json decides at conversion time
    "text_encoder": dict(vocab_size=384, d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12,
                         feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                         relative_attention_max_distance=128),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 512, 1024, 1024],
                layers_per_block=3, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4),
}


def sizes(name: str, group: int = 64) -> dict:
    cls = COMPONENTS[name]
    model = cls(cls.config_class.from_dict(RELEASED[name]))
    params = dict(tree_flatten(model.parameters()))
    chosen = Q.quantizable_layers(model, group)[0] if cls.quantize_by_default else set()
    native = 4 if name == "text_encoder" else 2  # ByT5 ships in fp32 and stays so
    out = {"params": sum(math.prod(v.shape) for v in params.values()), "bf16": 0, 8: 0, 4: 0}
    for key, value in params.items():
        n = math.prod(value.shape)
        out["bf16"] += n * native
        quantized = key.endswith(".weight") and key[: -len(".weight")] in chosen
        for bits in (8, 4):
            out[bits] += (n * bits // 8 + n // group * 2 * 2) if quantized else n * native
    return out


def main():
    rows = {name: sizes(name) for name in ("vision_language_encoder", "transformer", "text_encoder", "vae")}
    print(f"{'component':<26}{'params':>9}{'bf16':>10}{'8-bit':>10}{'4-bit':>10}")
    for name, r in rows.items():
        print(f"{name:<26}{r['params'] / 1e9:>8.2f}B{r['bf16'] / 1e9:>9.2f}G{r[8] / 1e9:>9.2f}G{r[4] / 1e9:>9.2f}G")
    total = {k: sum(r[k] for r in rows.values()) for k in ("bf16", 8, 4)}
    print(f"{'total':<26}{'':>9}{total['bf16'] / 1e9:>9.2f}G{total[8] / 1e9:>9.2f}G{total[4] / 1e9:>9.2f}G")


if __name__ == "__main__":
    main()
