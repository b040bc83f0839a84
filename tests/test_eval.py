"""mlx-glm-image-eval (mlx_glm_image/eval/): the scores against hand-computed values and reference libraries, the OCR
engine on text rendered with Debian's fonts (clean and distorted; noise), and the command end to end on the tiny
checkpoint, bad settings refused in one line before any model loads."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from commands import assert_one_line, run
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mlx_glm_image import metadata, runs
from mlx_glm_image.eval import command, ocr, score
from mlx_glm_image.pipeline.glyphs import get_glyph_texts

LATIN = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian's fonts-dejavu-core
CJK = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")  # Debian's fonts-noto-cjk
EN = ["FRESH BREAD DAILY", "Open 24 Hours", "Coffee Tea Juice", "Grand Opening Sale"]
ZH = ["欢迎光临", "新鲜面包", "营业时间", "春节快乐"]
CLEAN = 0.9  # the least word accuracy of a render: rapidocr 1.4.4 read every word of all 24 (1.0 each)


# -- the text scores, CVTG-2K's definition ------------------------------------------------------------------------

def test_words_split_as_cvtg2k_and_chinese_per_character():
    assert score.words("Grand OPENING  Sale!") == ["grand", "opening", "sale!"]  # CVTG-2K: lower(), split()
    assert score.words("大吉，欢迎！ Tel：123 咖啡Bar") == ["大", "吉", "欢", "迎", "tel", "123", "咖", "啡", "bar"]
    assert [score.language(w) for w in score.words("Open 营业")] == ["en", "zh", "zh"]
    # in the pipeline's order of quote kinds: '...', \u201c...\u201d, "...", \u300c...\u300d
    assert score.expected_words('A sign "Fresh Bread" and \u201c欢迎\u201d and \u300cSALE\u300d') == [
        "欢", "迎", "fresh", "bread", "sale"]


def test_scores_equal_hand_computed_values():
    """OCR output given directly: 5 of 7 expected words read; the similarities by hand."""
    expected = score.expected_words('A bakery sign "Fresh Bread Daily" and a banner \u201c欢迎光临\u201d')
    read = score.read_words(["FRESH BREAD", "DAILLY", "欢迎光"], expected)
    scores = score.text_score(expected, read)
    assert (scores["all"].words, scores["all"].correct) == (7, 5)
    assert scores["all"].word_accuracy == pytest.approx(5 / 7)
    assert (scores["en"].word_accuracy, scores["zh"].word_accuracy) == (pytest.approx(2 / 3), 0.75)
    # daily ~ dailly: 1 edit over 6 letters; 临 ~ 迎 (difflib ranks every one-character word 0; the largest wins): 1 of 1
    daily, lin = 1 - 1 / (6 + 1e-5), 1 - 1 / (1 + 1e-5)
    assert scores["en"].ned == pytest.approx((2 + daily) / 3, abs=1e-12)
    assert scores["zh"].ned == pytest.approx((3 + lin) / 4, abs=1e-12)
    assert scores["all"].ned == pytest.approx((5 + daily + lin) / 7, abs=1e-12)


def test_cvtg2k_counts_membership_and_nothing_read():
    """A word quoted twice and read once counts twice (CVTG-2K tests membership); nothing read scores ~0."""
    twice = score.text_score(["sale", "sale", "now"], ["sale"])["all"]
    assert (twice.correct, twice.words) == (2, 3)
    nothing = score.text_score(["open"], [])["all"]
    assert nothing.word_accuracy == 0 and nothing.ned == pytest.approx(1 - 4 / (4 + 1e-5))


def test_words_run_together_are_split_only_into_expected_words():
    vocabulary = score.words("OPEN DAILY 9 TO 5")
    assert score.read_words(["OPENDAILY9TO5"], vocabulary) == ["open", "daily", "9", "to", "5"]
    assert score.read_words(["OPENDAILLY"], vocabulary) == ["opendailly"]  # a misread stays misread
    assert score.read_words(["banana"], ["a", "b"]) == ["banana"]  # "n" is no expected word: no split


def test_levenshtein_and_ned_against_python_levenshtein():
    Levenshtein = pytest.importorskip("Levenshtein")
    import difflib

    rng = np.random.default_rng(0)
    letters = list("abcde") + list("欢迎光临")
    for _ in range(300):
        a, b = ("".join(rng.choice(letters, rng.integers(0, 9))) for _ in range(2))
        assert score.levenshtein(a, b) == Levenshtein.distance(a, b), (a, b)
        read = ["".join(rng.choice(letters, rng.integers(1, 7))) for _ in range(4)]
        word = a or "x"
        best = difflib.get_close_matches(word, read, n=1, cutoff=0)[0]
        cvtg = 1 - Levenshtein.distance(word, best) / (max(len(word), len(best)) + 1e-5)  # its unified_metrics_eval.py
        assert score.similarity(word, read) == pytest.approx(cvtg, abs=1e-15)


# -- closeness ------------------------------------------------------------------------------------------------------

def pairs():
    """Image pairs: noise apart, a gradient with noise added, blurred, and odd sizes."""
    rng = np.random.default_rng(1)
    ramp = np.broadcast_to(np.linspace(0, 255, 80)[None, :, None], (64, 80, 3)).astype(np.uint8)
    noisy = np.clip(ramp + rng.normal(0, 12, ramp.shape), 0, 255).astype(np.uint8)
    photo = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(1.5)))
    return [(ramp, noisy), (photo, blurred), (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
                                             rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))]


def test_psnr_and_ssim_against_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    for a, b in pairs():
        assert score.psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
        reference = metrics.structural_similarity(score.luminance(a), score.luminance(b), gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False, data_range=255)
        assert score.ssim(a, b) == pytest.approx(reference, rel=1e-9)
    a = pairs()[0][0]
    assert score.psnr(a, a) == np.inf and score.ssim(a, a) == pytest.approx(1.0)
    assert score.luminance(np.array([[[255, 0, 0]]], np.uint8))[0, 0] == pytest.approx(0.299 * 255)


# -- the OCR engine on rendered text --------------------------------------------------------------------------------

def render(lines: list[str], font: Path, size: int, side: int = 768) -> Image.Image:
    """``lines`` drawn in black on white, one under the other (768 px: rapidocr upscales a smaller side to 736)."""
    face = ImageFont.truetype(str(font), size)
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((side // 10, side // 8 + 3 * size * k), line, font=face, fill="black")
    return image


def distort(image: Image.Image, kind: str, rng) -> Image.Image:
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(1.0))
    if kind == "noise":
        noisy = np.asarray(image, np.float64) + rng.normal(0, 20, (image.height, image.width, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if kind == "rotate":
        return image.rotate(4, resample=Image.BICUBIC, fillcolor="white")
    return image


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("rapidocr_onnxruntime", reason="the OCR engine: pip install rapidocr-onnxruntime")
    for font in (LATIN, CJK):
        if not font.is_file():
            pytest.skip(f"{font} is absent: apt-get install fonts-dejavu-core fonts-noto-cjk")
    return ocr.engine("rapidocr")


def test_ocr_reads_rendered_words(engine):
    """English (DejaVu Sans) and Chinese (Noto Sans CJK) at 20, 32 and 48 px, clean, blurred, noisy, rotated 4°."""
    rng = np.random.default_rng(0)
    found = {}
    for kind in ("clean", "blur", "noise", "rotate"):
        for size in (20, 32, 48):
            for lines, font in ((EN, LATIN), (ZH, CJK)):
                expected = [w for line in lines for w in score.words(line)]
                read = engine.read(distort(render(lines, font, size), kind, rng))
                found[kind, size, font.name] = score.text_score(expected, score.read_words(read, expected))["all"]
    low = {k: s.word_accuracy for k, s in found.items() if s.word_accuracy < CLEAN}
    assert not low, f"word accuracy below {CLEAN}: {low}"


def test_ocr_reads_nothing_in_noise(engine):
    rng = np.random.default_rng(2)
    for h, w in ((64, 64), (256, 256), (768, 512)):
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        read = engine.read(noise)
        assert score.text_score(["open", "sale"], score.read_words(read, ["open", "sale"]))["all"].word_accuracy == 0
        assert read == [], read


def test_a_missing_engine_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ocr, "_importable", lambda module: False)
    for choice, package in (("rapidocr", "rapidocr-onnxruntime"), ("vision", "ocrmac")):
        with pytest.raises(ValueError, match=f"not installed: pip install {package}"):
            ocr.engine(choice)


# -- the prompt set -------------------------------------------------------------------------------------------------

def test_the_prompt_set():
    """Ours, read as the CLI reads prompt files: 60+ prompts, 1 to 30 quoted words each, English and Chinese,
    some with several strings, at sizes the released model takes; no apostrophe (the pipeline reads '...' as a
    quoted string too)."""
    entries = runs.read_prompt_file(str(command.PROMPTS))
    counts = [len(score.expected_words(e["prompt"])) for e in entries]
    languages = [{score.language(w) for w in score.expected_words(e["prompt"])} for e in entries]
    strings = [len(get_glyph_texts(e["prompt"])[0]) for e in entries]
    assert len(entries) >= 60 and min(counts) >= 1 and max(counts) <= 30
    assert sum(ls == {"en"} for ls in languages) >= 30 and sum(ls == {"zh"} for ls in languages) >= 15
    assert sum(ls == {"en", "zh"} for ls in languages) >= 3 and sum(n > 1 for n in strings) >= 10
    assert all("'" not in e["prompt"] for e in entries)
    assert {(e["width"], e["height"]) for e in entries} == {(1024, 1024), (1024, 768), (768, 1024)}


# -- the command ----------------------------------------------------------------------------------------------------

def test_settings_value_after_the_flag_and_groups(model_dir, tmp_path):
    """--setting "--cache" is the value, not a flag; settings that load the same models share a pipeline."""
    args = command.build_parser().parse_args(["--setting", "--steps 2", "--reference", "--cache", "--setting",
                                              "--dtype float32", "--output", str(tmp_path), "-m", str(model_dir),
                                              "--limit", "2"])
    assert args.reference == "--cache" and args.setting == ["--steps 2", "--dtype float32"]
    settings = command.plan(args)
    assert [s.label for s in settings] == ["--cache", "--steps 2", "--dtype float32"]
    assert len({s.load_key for s in settings}) == 2 and settings[0].load_key == settings[1].load_key
    assert [n for n, _ in settings[1].images] == [0, 1] and settings[1].images[0][1]["steps"] == 2


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "A sign that says \\"OPEN NOW\\"", "size": "64x64"}\n'
                    '{"prompt": "一块写着\u201c欢迎\u201d的牌子", "size": "64x64"}\n', encoding="utf-8")
    return path


def test_command_end_to_end(model_dir, prompts, tmp_path):
    """Two settings on the tiny checkpoint: the table, results.json, the sheet and the images, each made with its
    setting; OCR reads nothing in the noise the tiny model makes; closeness equals scikit-image's."""
    metrics = pytest.importorskip("skimage.metrics")
    pytest.importorskip("rapidocr_onnxruntime")
    out = tmp_path / "eval"
    proc = run("eval", "-m", model_dir, "--prompt-file", prompts, "--setting", "--steps 2", "--setting", "--steps 3",
               "--output", out, "--seeds", 0, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "word acc" in proc.stdout and "--steps 3" in proc.stdout and "reference" in proc.stdout
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert document["ocr"].startswith("rapidocr") and document["reference"] == "--steps 2"
    reference, other = document["settings"]
    for result, steps in ((reference, 2), (other, 3)):
        assert result["words"] == 4 and result["en"]["words"] == 2 and result["zh"]["words"] == 2
        assert result["word_accuracy"] == 0 and all(row["read"] == [] for row in result["per_image"])
        assert result["seconds_per_image"] > 0 and result["peak_memory_gb"] > 0
        for row in result["per_image"]:
            assert metadata.read(row["path"])["steps"] == steps
    pixels = [[np.asarray(Image.open(r["path"]).convert("RGB")) for r in s["per_image"]] for s in (reference, other)]
    mean_mse = np.mean([np.mean((a.astype(float) - b.astype(float)) ** 2) for a, b in zip(*pixels)])
    assert other["psnr_db"] == pytest.approx(10 * np.log10(255**2 / mean_mse), rel=1e-9)
    ssims = [metrics.structural_similarity(score.luminance(b), score.luminance(a), gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=255) for a, b in zip(*pixels)]
    assert other["ssim"] == pytest.approx(np.mean(ssims), rel=1e-9)
    assert reference["psnr_db"] is None and reference["ssim"] is None
    with Image.open(out / "sheet.png") as sheet:  # a header, then one row per prompt; a column per setting and labels
        assert sheet.width > 3 * 256 and sheet.height > 2 * 256


@pytest.mark.parametrize("args, message", [
    (["--setting", "--stepz 2"], "--setting '--stepz 2': unrecognized arguments: --stepz 2"),
    (["--setting", "--steps 0"], "--setting '--steps 0': "),
    (["--setting", "--steps"], "--setting '--steps': argument --steps: expected one argument"),
    (["--setting", "--seed 3"], "--setting '--seed 3': --seed is the eval's to give"),
    (["--setting", '--guidance "1.5'], "No closing quotation"),
    (["--setting", "--help"], "mlx-glm-image --help lists the flags"),
    pytest.param(["--setting", "", "--ocr", "vision"], "the OCR engine vision is not installed",
                 marks=pytest.mark.skipif(sys.platform == "darwin", reason="ocrmac may be installed on a Mac")),
    ([], "give at least one --setting"),
])
def test_bad_settings_are_one_line_before_any_model_loads(args, message, prompts, tmp_path):
    """-m names no model: an error about the settings (or the engine) shows they were checked before any model
    was looked at."""
    proc = run("eval", "-m", tmp_path / "no-model", "--prompt-file", prompts, "--output", tmp_path / "out", *args)
    assert_one_line(proc, message)
    assert not (tmp_path / "out").exists()


def test_setting_parses_as_the_cli(model_dir):
    setting = command.parse_setting("--steps 7 --guidance 2 -q 4 --cache", str(model_dir),
                                    [{"prompt": 'a "sign"', "width": 64, "height": 64}], [5, 6])
    assert [image["seed"] for _, image in setting.images] == [5, 6]
    image = setting.images[0][1]
    assert (image["steps"], image["guidance"], image["width"], image["cache"] is not None) == (7, 2.0, 64, True)
    assert setting.run["quantize"] == 4 and setting.run["model"] == str(model_dir)
