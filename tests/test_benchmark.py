"""`python src/benchmark.py SUBCOMMAND` prints one JSON object per run (tiny sizes here)."""

import json

import benchmark  # src/benchmark.py (conftest puts src/ on sys.path)


def test_augment_subcommand_prints_one_json_object(capsys):
    result = benchmark.main(["augment", "--batch", "4", "--size", "32", "--labels", "10", "--timm-images", "4",
                             "--repeats", "1", "--timm-repeats", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    assert result["benchmark"] == "augment" and set(result["policies"]) == {"deit", "deit3"}
    for p in result["policies"].values():
        assert p["device_images_per_s"] > 0 and p["timm_images_per_s_per_core"] > 0
        assert 0 < p["fraction_of_train_step"]
    assert result["train_step"]["ms"] > 0


def test_loader_subcommand_prints_one_json_object(capsys):
    result = benchmark.main(["loader", "--count", "40", "--batch", "8", "--batches", "2", "--warmup", "1",
                             "--rounds", "2", "--shuffle-buffer", "16"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    assert result["benchmark"] == "loader" and result["images"] == 40 and result["image_size"] == 224
    assert result["workers"] == 0 and len(result["load_average"]) == 3
    assert "simplejpeg" in result["jpeg_decoder"] and "PIL" in result["timm_jpeg_decoder"]
    for k in ("ours_images_per_s", "ours_images_per_s_per_core", "timm_images_per_s_per_core", "ratio_per_core"):
        assert result[k] > 0, k
    assert result["ours_images_per_s_per_core"] == result["ours_images_per_s"]
    assert len(result["ours_rounds"]) == len(result["timm_rounds"]) == len(result["round_ratios"]) == 2
    for k in ("ours_images_per_cpu_s", "timm_images_per_cpu_s", "ratio_per_cpu_s"):
        assert result[k] > 0, k
    # CPU time can only be <= wall time for a one-thread loop, so per-CPU-second rates are >= wall rates
    assert result["timm_images_per_cpu_s"] >= 0.9 * result["timm_images_per_s_per_core"]
