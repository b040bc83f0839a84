"""``--check``'s decision from given sizes and budgets (mlx_glm_image.preflight.verdict), and the released
checkpoint's figures it falls back to when the Hub does not answer."""

import math
from pathlib import Path

from mlx.utils import tree_flatten

from mlx_glm_image import preflight as P
from mlx_glm_image.conversion import human
from mlx_glm_image.pipeline.components import MODELS, RESIDENT_SHARE
from mlx_glm_image.models import released

GB = 10**9
# per model, bytes once loaded at no -q / -q 8 / -q 4
SIZES = {"vision_language_encoder": {None: 20 * GB, 8: 10 * GB, 4: 6 * GB},
         "text_encoder": {None: 1 * GB, 8: 1 * GB, 4: 1 * GB},
         "transformer": {None: 14 * GB, 8: 7 * GB, 4: 4 * GB},
         "vae": {None: 1 * GB, 8: 1 * GB, 4: 1 * GB}}


def facts(budget_allowed: float, **kw):
    """Facts whose models may take ``budget_allowed`` bytes (the budget is that over RESIDENT_SHARE)."""
    return P.Facts(model="org/model", source="test", budget=math.ceil(budget_allowed / RESIDENT_SHARE),
                   weights=SIZES, **kw)


def test_peaks_resident_is_the_sum_staged_the_largest_stage_with_the_vae_beside_the_dit():
    assert P.peaks({n: s[None] for n, s in SIZES.items()}) == {"resident": 36 * GB, "staged": 20 * GB}
    assert P.peaks({n: s[4] for n, s in SIZES.items()}) == {"resident": 12 * GB, "staged": 6 * GB}
    # the DiT's stage holds the VAE too (editing and previews load it while denoising)
    assert P.peaks({"vision_language_encoder": 1, "text_encoder": 1, "transformer": 5, "vae": 3})["staged"] == 8


def test_the_most_precise_fitting_mode_is_chosen():
    assert P.verdict(facts(40 * GB)) == (0, f"can run: --memory resident ({human(36 * GB)} of weights at once, "
                                             f"{human(40 * GB)} allowed)")
    code, reason = P.verdict(facts(20 * GB))  # resident needs 36 GB; staged bf16 holds 20 GB at once
    assert code == 0 and reason.startswith("can run: --memory staged (20.0 GB")
    code, reason = P.verdict(facts(12 * GB))  # -q 8 staged: 10 GB; -q 4 resident 12 GB comes after it
    assert code == 0 and reason.startswith("can run: -q 8 --memory staged (10.0 GB")


def test_nothing_fits_is_exit_1_with_the_smallest_need():
    code, reason = P.verdict(facts(5 * GB))
    assert code == 1
    assert "do not fit in memory" in reason and "-q 4 --memory staged, holds 6.0 GB" in reason
    assert human(5 * GB) in reason and human(math.ceil(5 * GB / RESIDENT_SHARE)) in reason


def test_what_the_user_asked_is_what_is_judged():
    code, reason = P.verdict(facts(12 * GB, bits=8, memory="resident"))
    assert code == 1 and "-q 8 --memory resident, holds 19.0 GB" in reason and reason.endswith("; -q 8 --memory staged fits")
    assert P.verdict(facts(12 * GB, bits=4, memory="resident"))[1].startswith("can run: -q 4 --memory resident")
    # a converted folder loads as stored: -q changes nothing
    converted = P.Facts(model="m", source="test", budget=GB, weights={n: dict.fromkeys((None, 8, 4, 3), GB // 10)
                                                                      for n in SIZES}, bits=3, converted=True)
    assert P.verdict(converted)[1].startswith("can run: --memory resident")


def test_the_download_must_be_possible_and_fit():
    code, reason = P.verdict(facts(40 * GB, download=36 * GB, reachable=False, hub="the Hub did not answer (x)"))
    assert code == 1
    assert reason == ("cannot run yet: the Hub did not answer (x), and org/model is not in the Hub cache (36.0 GB to "
                      "download); --memory resident would fit")
    code, reason = P.verdict(facts(40 * GB, download=36 * GB, download_room=False, download_free=10 * GB,
                                   download_dir=Path("/cache")))
    assert code == 1 and "the download, 36.0 GB, does not fit in /cache (10.0 GB free); set HF_HOME" in reason
    assert P.verdict(facts(40 * GB, download=36 * GB))[1].endswith(", after a download of 36.0 GB")


def test_no_sizes_is_exit_1():
    f = P.Facts(model="org/other", source="", budget=GB, weights=None, hub="the Hub did not answer (x)")
    assert P.verdict(f) == (1, "cannot tell: the Hub did not answer (x), and org/other is neither a local folder, in "
                               "the Hub cache nor the released checkpoint")


def test_released_figures_are_the_released_configs_parameters_times_their_stored_dtype():
    itemsize = {"vision_language_encoder": 2, "text_encoder": 4, "transformer": 2, "vae": 2}
    for name, cls in MODELS.items():
        count = sum(v.size for _, v in tree_flatten(cls(released.config(name)).parameters()))
        assert P.RELEASED[name] == count * itemsize[name], name
    # docs/checkpoint.md: about 36 GB; AR ~20, DiT ~14 (6.93 B parameters), VAE ~0.8, ByT5 ~0.9
    assert round(sum(P.RELEASED.values()) / GB) == 36
    assert [round(P.RELEASED[n] / GB, 1) for n in MODELS] == [20.2, 0.9, 13.9, 0.8]


def test_released_quantized_estimates():
    """The DiT at -q 8 / -q 4 (affine, group 64): ~7.4 / ~4 GB; the AR model with its token table quantized too."""
    est = {n: P.estimate(MODELS[n], None, b, (None, 8, 4)) for n, b in P.RELEASED.items()}
    assert round(est["transformer"][8] / GB, 1) == 7.4 and round(est["transformer"][4] / GB, 1) == 4.0
    assert round(est["vision_language_encoder"][4] / GB, 1) == 5.8
    assert est["text_encoder"][4] == P.RELEASED["text_encoder"] and est["vae"][4] == P.RELEASED["vae"]
