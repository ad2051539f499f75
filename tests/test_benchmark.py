"""`python src/benchmark.py SUBCOMMAND` prints one JSON object per run (tiny sizes here)."""

import json

import pytest

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


def test_train_subcommand_prints_one_json_object(capsys):
    result = benchmark.main(["train", "--model", "ti16", "--layers", "2", "--scan-unroll", "0", "--image-size", "32",
                             "--batch", "4", "--labels", "10", "--rounds", "2", "--matmul-size", "128"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    assert result["benchmark"] == "train" and result["batch"] == 4 and result["dtype"] == "float32"
    assert result["model"]["layers"] == 2 and result["model"]["dim"] == 192 and result["image_size"] == 32
    assert len(result["load_average"]) == 3 and result["threads"] >= 1
    assert result["host_memory_retained"] is False  # deit.hostmem is applied by the script's __main__ only
    for k in ("train_images_per_s", "train_aug_images_per_s", "eval_images_per_s", "timm_train_images_per_s",
              "timm_eval_images_per_s", "train_flops_per_s", "matmul_peak_flops_per_s", "train_mfu", "eval_mfu",
              "peak_host_rss_mib"):
        assert result[k] > 0, k
    assert abs(result["train_ratio"] * result["timm_train_images_per_s"] / result["train_images_per_s"] - 1) < 0.01
    assert abs(result["eval_ratio"] * result["timm_eval_images_per_s"] / result["eval_images_per_s"] - 1) < 0.01
    # MFU is achieved model FLOP/s (3x forward for a train step) over the measured matmul peak
    fwd = result["forward_flops_per_image"]
    assert abs(result["train_flops_per_s"] / (3 * fwd * result["train_images_per_s"]) - 1) < 0.01
    assert abs(result["train_mfu"] * result["matmul_peak_flops_per_s"] / result["train_flops_per_s"] - 1) < 0.01
    # timm's model FLOP/s over the same peak
    peak = result["matmul_peak_flops_per_s"]
    assert result["timm_train_mfu"] == pytest.approx(3 * fwd * result["timm_train_images_per_s"] / peak, rel=0.02, abs=1e-4)
    assert result["timm_eval_mfu"] == pytest.approx(fwd * result["timm_eval_images_per_s"] / peak, rel=0.02, abs=1e-4)
    assert result["model"]["scan_unroll"] == 2  # --scan-unroll 0: all of --layers 2
    assert set(result["compile_s"]) == {"train", "eval", "train_aug", "matmul", "timm_train", "timm_eval"}
    assert all(len(v) == 2 for v in result["seconds"].values())


def test_ops_subcommand_prints_one_json_object(capsys):
    result = benchmark.main(["ops", "--model", "ti16", "--image-size", "32", "--batch", "2", "--rounds", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    assert result["benchmark"] == "ops" and result["tokens"] == 5 and result["model"]["dim"] == 192
    ops = [r["op"] for r in result["rows"]]
    assert ops[-1] == "block" and {"qkv", "q@k", "softmax", "attn@v", "fc1", "gelu", "fc2"} <= set(ops)
    for r in result["rows"]:
        for kind in ("fwd", "fwdbwd"):
            assert r[f"ours_{kind}_ms"] > 0 and r[f"timm_{kind}_ms"] > 0, r
            assert r[f"{kind}_ratio"] == pytest.approx(r[f"timm_{kind}_ms"] / r[f"ours_{kind}_ms"], rel=0.01)
    parts = [r for r in result["rows"] if r["op"] not in ("attention_core", "block")]
    assert result["sum_of_parts"]["ours_fwd_ms"] == pytest.approx(sum(r["ours_fwd_ms"] for r in parts), abs=1e-2)
    # The bare weight matmuls: M = batch x tokens, GFLOP/s from each side's own time.
    assert [(g["op"], g["m"], g["k"], g["n"]) for g in result["gemms"]] == [
        ("qkv", 10, 192, 576), ("proj", 10, 192, 192), ("fc1", 10, 192, 768), ("fc2", 10, 768, 192)]
    for g in result["gemms"]:
        assert g["ours_gflops"] > 0 and g["timm_gflops"] > 0
        assert g["ratio"] == pytest.approx(g["ours_gflops"] / g["timm_gflops"], rel=0.01)
    assert result["bf16_dots_upcast"] is None  # float32 run


def test_device_subcommand_prints_one_json_object(capsys):
    """On CPU `benchmark.py device` runs its tiny version: every part, every field."""
    result = benchmark.main(["device", "--models", "ti16", "--rounds", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    assert result["benchmark"] == "device" and result["tiny"] is True and result["skipped"] == []
    assert (result["batch"], result["image_size"], result["layers"], result["dtype"]) == (4, 32, 2, "bfloat16")
    m = result["models"]["ti16"]
    for k in ("train_images_per_s", "train_mfu", "eval_images_per_s", "train_aug_deit_images_per_s",
              "train_aug_deit3_images_per_s", "timm_train_images_per_s", "train_vs_timm"):
        assert m[k] > 0, k
    assert m["train_mfu"] == pytest.approx(3 * m["forward_flops_per_image"] * m["train_images_per_s"]
                                           / m["mfu_peak_flops_per_s"], rel=0.01)
    for p in ("deit", "deit3"):
        frac = 1 - m[f"train_aug_{p}_images_per_s"] / m["train_images_per_s"]
        assert m[f"augment_{p}_fraction_of_step"] == pytest.approx(max(0.0, frac), abs=1e-3)
    assert {"train", "eval", "train_aug", "timm_train"} <= set(m["compile_s"])
    assert result["timm_compile"] is False and result["loader"]["images_per_s"] > 0
    assert result["loader"]["workers"] >= 1 and result["wall_s"] > 0


def test_device_subcommand_skips_what_the_budget_leaves_no_time_for():
    result = benchmark.main(["device", "--models", "ti16", "--budget-s", "0"])
    assert result["models"] == {} and result["skipped"] == ["ti16", "loader"]
