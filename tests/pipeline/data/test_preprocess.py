"""The metadata checks of the CPU preprocessing stage: LAION score columns by each name they go by, and
caption-less records kept only when asked for."""
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
