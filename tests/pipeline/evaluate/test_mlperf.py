"""The MLPerf text-to-image protocol's parts (pipeline/evaluate/mlperf.py); its end to end run on stand-in files is in
test_evaluate_model.py, beside the trained model it scores."""
import numpy as np
import pytest
import torch

from helpers import coco_json
from pipeline.evaluate.mlperf import MLPerfOptions, check_files, fid_from_stats, read_captions
from pipeline.evaluate.scores import frechet_distance


def test_captions_one_per_image_in_a_subset_drawn_by_seed(tmp_path):
    path = str(coco_json(tmp_path / "captions_val2014.json"))
    a, again, other = read_captions(path, 5, 2023), read_captions(path, 5, 2023), read_captions(path, 5, 1)
    assert a == again and a != other and len(set(a)) == 5
    assert all(c.endswith(f"caption {2}") for c in a)  # each image's first annotation by id, stripped
    assert len({c.split(" caption")[0] for c in read_captions(path, 8, 0)}) == 8  # every image once
    tsv = tmp_path / "val2014_30k.tsv"
    tsv.write_text("id\timage_id\tcaption\n" + "".join(f"{i}\t{i}\tcap {i}\n" for i in range(4)))
    assert read_captions(str(tsv), 3, 2023) == ["cap 0", "cap 1", "cap 2"]  # MLPerf's own subset, in its order
    with pytest.raises(ValueError, match="holds 8 captions"):
        read_captions(path, 9, 0)


def test_fid_from_reference_statistics_equals_fid_from_the_reference_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 6, generator=g), torch.randn(150, 6, generator=g) * 1.3 + 0.4
    np.savez(tmp_path / "stats.npz", mu=real.double().mean(0).numpy(), sigma=np.cov(real.double().numpy().T))
    assert fid_from_stats(fake, str(tmp_path / "stats.npz")) == pytest.approx(frechet_distance(real, fake), rel=1e-4)
    with pytest.raises(ValueError, match="statistics of 6-d features"):
        fid_from_stats(torch.randn(10, 4), str(tmp_path / "stats.npz"))


def test_each_missing_file_is_named_with_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        check_files(MLPerfOptions(model="m", captions=str(tmp_path / "none.json"), inception_weights="",
                                  clip_model="", fid_stats=""))
    msg = str(e.value)
    assert "--captions" in msg and "captions_val2014.json" in msg and "inception-2015-12-05.pt" in msg
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg and "val2014_30k_stats.npz" in msg
