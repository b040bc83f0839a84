"""On-disk size of each released GLM-Image component at bf16, 8-bit and 4-bit, from the shapes alone.

Builds every MLX model at its released config (the package's config classes, via common.released) without
allocating it (MLX parameters are lazy), applies the converter's quantization policy (each model's own predicate,
quantize.quantizable_layers) and counts bytes: bf16 tensors 2 bytes per value; a quantized layer bits/8 per
weight plus a bf16 scale and bias per group of 64. The text encoder (fp32) and the VAE stay in full precision, as
convert.py's default policy keeps them.

    python benchmarks/model_sizes.py
"""

import math

from mlx.utils import tree_flatten

import common

common.use_checkout()
from mlx_glm_image import quantize as Q  # noqa: E402
from mlx_glm_image.convert import COMPONENTS  # noqa: E402

RELEASED = {name: common.released(name) for name in ("vision_language_encoder", "transformer", "text_encoder", "vae")}


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
    rows = {name: sizes(name) for name in RELEASED}
    print(f"{'component':<26}{'params':>9}{'bf16':>10}{'8-bit':>10}{'4-bit':>10}")
    for name, r in rows.items():
        print(f"{name:<26}{r['params'] / 1e9:>8.2f}B{r['bf16'] / 1e9:>9.2f}G{r[8] / 1e9:>9.2f}G{r[4] / 1e9:>9.2f}G")
    total = {k: sum(r[k] for r in rows.values()) for k in ("bf16", 8, 4)}
    print(f"{'total':<26}{'':>9}{total['bf16'] / 1e9:>9.2f}G{total[8] / 1e9:>9.2f}G{total[4] / 1e9:>9.2f}G")


if __name__ == "__main__":
    main()
