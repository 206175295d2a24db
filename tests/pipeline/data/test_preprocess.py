"""The CPU preprocessing stage: LAION score columns by each name they go by, caption-less records kept only when
asked for, and label maps cropped exactly as their images."""
import json

import pytest

from pipeline.data.preprocess import PreprocessConfig, check_metadata


@pytest.mark.parametrize("column", ["aesthetic", "AESTHETIC_SCORE", "aesthetic_score"])
def test_min_aesthetic_reads_every_column_name(column):
    cfg = PreprocessConfig(min_aesthetic=5.0)
    assert check_metadata("a cat", json.dumps({column: 4.2}), cfg) == "low_aesthetic"
    assert check_metadata("a cat", json.dumps({column: 6.1}), cfg) is None
    assert check_metadata("a cat", json.dumps({column: "n/a"}), cfg) == "bad_metadata"


def test_upper_case_laion_scores_filter_too():
    cfg = PreprocessConfig()
    assert check_metadata("a cat", json.dumps({"PUNSAFE": 0.9}), cfg) == "unsafe"
    assert check_metadata("a cat", json.dumps({"PWATERMARK": 0.7}), cfg) == "watermark"
    assert check_metadata("a cat", json.dumps({"SIMILARITY": 0.1}), PreprocessConfig(min_similarity=0.3)) == \
        "low_similarity"


@pytest.mark.parametrize("caption", [None, "", "   "])
def test_captionless_records_are_kept_only_with_min_caption_chars_0(caption):
    assert check_metadata(caption, "", PreprocessConfig()) == "missing_caption"
    assert check_metadata(caption, "", PreprocessConfig(min_caption_chars=0)) is None
    # the other filters still apply to a caption-less record
    assert check_metadata(caption, json.dumps({"punsafe": 0.99}), PreprocessConfig(min_caption_chars=0)) == "unsafe"


def test_caption_length_bounds():
    assert check_metadata("ab", "", PreprocessConfig(min_caption_chars=3)) == "missing_caption"
    assert check_metadata("x" * 11, "", PreprocessConfig(max_caption_chars=10)) == "caption_too_long"
    assert check_metadata("  abc  ", "", PreprocessConfig(min_caption_chars=3)) is None


def _png(arr) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_label_map_is_resized_and_cropped_exactly_as_its_image():
    """--resize 64 --resolution 32 --crop random: a 32x32 crop of a 64x64 scene at its own scale; the label map's crop
    is the same window (nearest: ids stay ids), and records without one or with a broken one are counted."""
    import numpy as np

    from pipeline.data.preprocess import preprocess_batch
    img = np.zeros((64, 64, 3), np.uint8)
    seg = np.zeros((64, 64), np.uint8)
    img[10:30, 40:60], seg[10:30, 40:60] = 200, 7
    cfg = PreprocessConfig(resolution=32, resize=64, crop="random", label_maps=True, min_caption_chars=0)
    batch = {"key": np.array(["a", "b", "c"], dtype=object), "caption": np.array(["", "", ""], dtype=object),
             "meta": np.array(["", "", ""], dtype=object), "skip": np.array(["", "", ""], dtype=object),
             "image": np.array([_png(img)] * 3, dtype=object),
             "label_map": np.array([_png(seg), b"", _png(seg[:32])], dtype=object)}
    out = preprocess_batch(batch, cfg)
    assert list(out["skip"]) == ["", "missing_label_map", "bad_label_map"]
    px = np.frombuffer(out["pixels"][0], np.uint8).reshape(32, 32, 3)
    m = np.frombuffer(out["label_map"][0], np.uint8).reshape(32, 32)
    t, le = int(out["crop_top"][0]), int(out["crop_left"][0])
    assert (m == seg[t:t + 32, le:le + 32]).all() and (px[..., 0] == img[t:t + 32, le:le + 32, 0]).all()
    assert set(np.unique(m)) <= {0, 7}
    small = preprocess_batch({**batch, "label_map": np.array([_png(seg)] * 3, dtype=object)},
                             PreprocessConfig(resolution=16, label_maps=True, min_caption_chars=0))
    m16 = np.frombuffer(small["label_map"][0], np.uint8).reshape(16, 16)  # downscaled by 4, nearest
    assert set(np.unique(m16)) == {0, 7} and 20 <= (m16 == 7).sum() <= 30


def test_layout_boxes_move_with_the_crop_and_bad_layouts_are_counted():
    """--layout-boxes: each box of the metadata's layout follows the resize and the crop, is clipped to the crop and
    dropped when nothing of it is left; records without a layout, with a malformed one or with too many boxes in the
    crop are skipped by reason."""
    import numpy as np

    from pipeline.data.preprocess import preprocess_batch
    img = np.zeros((64, 128, 3), np.uint8)  # wide: resized to 32x64, a 32x32 centre crop from x = 16
    good = {"layout": [[3, 8, 40, 20, 30], [5, 0, 0, 10, 20], [1, 40, 110, 20, 16]]}
    metas = [good, {}, {"layout": [[2, 0, 0, -4, 4]]}, {"layout": "nope"},
             {"layout": [[c, 8, 40, 8, 8] for c in range(4)]}]
    n = len(metas)
    batch = {"key": np.array([str(i) for i in range(n)], dtype=object), "caption": np.array([""] * n, dtype=object),
             "meta": np.array([json.dumps(m) for m in metas], dtype=object), "skip": np.array([""] * n, dtype=object),
             "image": np.array([_png(img)] * n, dtype=object)}
    out = preprocess_batch(batch, PreprocessConfig(resolution=32, layout_boxes=3, min_caption_chars=0))
    assert list(out["skip"]) == ["", "missing_layout", "bad_layout", "bad_layout", "too_many_boxes"]
    boxes = np.frombuffer(out["layout"][0], np.int16).reshape(3, 5).tolist()
    # (8, 40, 20x30) halved and shifted left by 16: top 4, left 4, 10x15; (0, 0, 10x20) -> x in [-16, -6): gone;
    # (40, 110, 20x16) -> y [20, 30), x [39, 47) clipped to [39, 32): gone as well
    assert boxes == [[3, 4, 4, 10, 15], [-1] * 5, [-1] * 5]
